"""What the native primitives save (``training/speed/native.cpp``: attention, the SiLU gate, RMSNorm, the rotary
embedding, the cross-entropy loss; ``training/speed/quad_fit.cpp``: QUAD's preconditioner fit and momentum):

    python benchmarks/native_primitives.py [attention|gate|norm|rope|loss|all|quad] [--repeats 3] [--epochs 20] [--set KEY=VALUE ...]

Each measurement is a fresh process that trains the default run (``training.loop.train``, no files) for
``--epochs`` epochs with MLX's computation of the chosen primitives (``all`` by default) or with the native one
(the speed layer's default where it builds); the two kinds alternate ``--repeats`` times after one unmeasured
epoch each. It prints the median ms per step and per evaluation of each and their ratios. The native gate gives
MLX's fused gate's bits and the native rotary embedding ``kernels.rope``'s, so ``gate`` and ``rope`` compare runs
with the same metrics; the native attention sums its dot
products in another order, the native RMSNorm its sums and the native loss its exponentials, so with them the
metrics differ by float rounding. Each kind's runs should agree to the last bit. ``quad`` trains with QUAD
(``optim.name=quad``, unless ``--set`` gives another) and compares its plain fit and momentum (``optimizers.quad``)
with the native ones; the fit's sums differ from MLX's by float rounding.
"""
import sys

from fresh_runs import compare, parse_args

FLAGS = {"attention": ("native_attention",), "gate": ("native_gate",), "norm": ("native_norm",),
         "rope": ("native_rope",), "loss": ("native_loss",),
         "all": ("native_attention", "native_gate", "native_norm", "native_rope", "native_loss")}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in (*FLAGS, "quad"):
        print(f"native_primitives.py: error: KIND={argv[0]!r} must be one of {', '.join((*FLAGS, 'quad'))}",
              file=sys.stderr)
        return 2
    which = argv.pop(0) if argv and argv[0] in FLAGS else "all"
    if argv and argv[0] == "quad":
        args, overrides = parse_args(__doc__, argv[1:])
        plain = ("import functools\nimport training.speed.trainer as speed\n"
                 "speed.FastTrainer.__init__ = functools.partialmethod(speed.FastTrainer.__init__, native_quad=False)")
        return compare({"plain QUAD fit": (plain, {}), "native QUAD fit": ("", {})}, args,
                       {"optim.name": "quad", **overrides})
    args, overrides = parse_args(__doc__, argv)
    off = ", ".join(f"{flag}=False" for flag in FLAGS[which])
    mlx = ("import training.speed.trainer as speed\nfast_model = speed.FastModel\n"
           f"speed.FastModel = lambda model, cfg: fast_model(model, cfg, {off})")
    kinds = {f"MLX's {which}": (mlx, {}), f"native {which}": ("", {})}
    return compare(kinds, args, overrides, same_across_kinds=which in ("gate", "rope"))


if __name__ == "__main__":
    sys.exit(main())

"""Train the grokking transformer: ``python main.py [flags]`` (see README). Flags -> Config -> train -> figures."""
import fastblas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import json
import sys

from config import ArgumentParser, Config, add_knob_flags, override, parse_dotted, parse_value
from training.loop import train


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description="Train a transformer on a ∘ b mod p and watch it grok.",
        epilog="Any config field can also be set as --section.field=value, e.g. --optim.lr=3e-3 "
               "(sections: data, model, optim, train; see README).")
    add_knob_flags(parser)
    parser.add_argument("--out", default="runs/default", help="run directory for results (default: %(default)s)")
    parser.add_argument("--plot", default="media/grokking.png",
                        help="figure path; a _dark variant is saved beside it (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw figures")
    return parser


def parse_args(argv):
    """``(config, args)`` from command-line arguments: the knob flags plus ``--section.field=value``."""
    args, rest = build_parser().parse_known_args(argv)
    texts = {k: v for k, v in vars(args).items() if ("." in k or k == "seed") and v is not None}
    texts.update(parse_dotted(rest))
    return override(Config(), {k: parse_value(v) for k, v in texts.items()}), args


def main(argv=None) -> int:
    try:
        config, args = parse_args(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = train(config, args.out)
    print(json.dumps({k: summary[k] for k in ("final_train_acc", "final_val_acc", "epochs_to_90", "epochs_to_99",
                                              "steps_to_99", "wall_s", "ms_per_step")}))
    print(f"results in {args.out}/")
    if not args.no_plot:
        import plot
        for path in plot.plot_run(args.out, args.plot):
            print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line of the sweeps: ``python -m sweeps {optimizers,architecture,table,plot} ...``."""
import sys
from pathlib import Path

import sweeps
from config import KNOB, ArgumentParser, add_knob_flags, check_out_dir, parse_dotted, parse_value
from optimizers import OPTIMIZERS
from sweeps import results, verdict
from sweeps.executors import LocalPool
from sweeps.runner import run_sweep
from sweeps.spec import apply_axes, default_spec, expand, uses
from training.checkpoints import Interval

COMMANDS = ("optimizers", "architecture", "table", "plot")
DEFAULT_OUT = {"optimizers": "runs/optimizers", "architecture": "runs/architecture"}
DEFAULT_MEDIA = "media"
PLURAL = {"optim.name": ("--optimizers", "--optimizer"), "seed": ("--seeds", "--seed")}


def parse_list(flag: str, text: str) -> list:
    """``"1e-3,3e-3"`` -> ``[0.001, 0.003]``; items are Python literals or strings, as in main.py."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ValueError(f"malformed list {flag} {text!r}: empty item")
    return [parse_value(item) for item in items]


def sweep_parser(kind: str) -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m sweeps {kind}", allow_abbrev=False,
                            description=f"Run the {kind} sweep (see sweeps/{kind}.py). A flag given replaces that "
                                        "axis of the grid; comma lists sweep several values.",
                            epilog="Any config field is also an axis as --section.field=v1,v2 (e.g. "
                                   "--model.mlp_ratio=2,4). Finished runs are skipped; unfinished ones are redone.")
    add_knob_flags(parser, renamed=PLURAL, help_suffix=", comma list")
    if kind == "architecture":
        parser.add_argument("--from-results", metavar="DIR", default=None,
                            help="take each optimizer's best configuration from an optimizer sweep's directory")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: worker processes on this machine (default); ray: Ray tasks on a Ray cluster "
                             "or a local Ray instance (pip install -r requirements-ray.txt)")
    parser.add_argument("--workers", type=int, default=None,
                        help="local executor: runs at once, each in its own process (default: 1)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="ray: the cluster to run on (auto: the one running on this machine, HOST:PORT; "
                             "default: start a local Ray instance for this sweep)")
    parser.add_argument("--ray-cpus-per-run", type=float, default=None, metavar="N",
                        help="ray: CPUs each run declares, and its BLAS threads (default: 1)")
    parser.add_argument("--ray-gpus-per-run", type=float, default=None, metavar="N",
                        help="ray: GPUs each run declares (default: 0)")
    parser.add_argument("--ray-retries", type=int, default=None, metavar="N",
                        help="ray: times a run whose worker died is retried before it is recorded as failed "
                             "(default: 2)")
    parser.add_argument("--checkpoint-every", default="10", metavar="INTERVAL",
                        help="each run's checkpoints: N (epochs), Nsteps, log:N or off (default: %(default)s); "
                             "a killed run continues from its latest")
    parser.add_argument("--out", default=DEFAULT_OUT[kind], help="sweep directory (default: %(default)s)")
    parser.add_argument("--media", default=None,
                        help=f"figure directory (default: {DEFAULT_MEDIA}/ with the default --out, else OUT/media)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw figures")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and what is already done; run nothing")
    add_target_flag(parser)
    if kind == "optimizers":
        parser.add_argument("--extend", action="store_true",
                            help="where a best point is on the edge of a searched axis, run the next values outward "
                                 "until it is interior or a bound (the registry's limits) stops it")
        parser.add_argument("--extend-rounds", type=int, default=verdict.EXTEND_ROUNDS, metavar="N",
                            help="at most N extension rounds (default: %(default)s)")
        parser.add_argument("--confirm-seeds", default=None, metavar="SEEDS",
                            help="rerun each optimizer's best on these seeds, disjoint from --seeds, and report on "
                                 f"them alone (default: {','.join(map(str, verdict.CONFIRM_SEEDS))}; none: skip)")
    return parser


def add_target_flag(parser) -> None:
    parser.add_argument("--target", default=None, metavar="T",
                        help="headline target, from what summaries record: 0.9, 0.95, 0.99 or sustained95 "
                             "(default: each run's early stop, else 0.9)")


RAY_FLAGS = {"ray_address": "--ray-address", "ray_cpus_per_run": "--ray-cpus-per-run",
             "ray_gpus_per_run": "--ray-gpus-per-run", "ray_retries": "--ray-retries"}


def build_executor(args):
    """The executor the flags ask for; ValueError for a flag of the other executor, or Ray not installed."""
    if args.executor == "local":
        given = [flag for key, flag in RAY_FLAGS.items() if getattr(args, key) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --executor ray")
        return LocalPool(1 if args.workers is None else args.workers, args.checkpoint_every)
    if args.workers is not None:
        raise ValueError("--workers is for the local executor; with --executor ray the cluster runs as many runs "
                         "at once as its CPUs allow (see --ray-cpus-per-run)")
    from sweeps.ray_executor import RayExecutor  # imports Ray itself only when it runs
    cpus, gpus, retries = ((default if value is None else value) for value, default in
                           ((args.ray_cpus_per_run, 1), (args.ray_gpus_per_run, 0), (args.ray_retries, 2)))
    return RayExecutor(args.ray_address, cpus, gpus, retries, args.checkpoint_every)


def parse_sweep_args(kind: str, argv: list) -> tuple:
    """``(spec, args, executor)`` from a sweep command line; ValueError for bad input."""
    parser = sweep_parser(kind)
    args, rest = parser.parse_known_args(argv)
    check_out_dir(args.out)
    given = {key: text for key, text in vars(args).items() if text is not None and (key == "seed" or "." in key)}
    axes = {key: parse_list((PLURAL.get(key) or (KNOB[key].flag,))[0], text) for key, text in given.items()}
    axes.update({key: parse_list(f"--{key}", text) for key, text in parse_dotted(rest).items()})
    Interval.parse(args.checkpoint_every, "--checkpoint-every")
    executor = build_executor(args)
    spec = default_spec(kind)
    if getattr(args, "from_results", None):
        best = results.best_from_results(Path(args.from_results))
        spec.search = {name: {k: v for k, v in axes_of.items() if uses(name, k)} for name, axes_of in best.items()}
        if "optim.name" not in axes:
            spec.optimizers = [n for n in OPTIMIZERS if n in best]
        missing = [n for n in axes.get("optim.name", []) if n not in best]
        if missing:
            raise ValueError(f"{args.from_results} has no results for {', '.join(map(str, missing))}")
    spec = apply_axes(spec, axes)
    expand(spec)  # validate every config before anything runs
    args.target = results.parse_target(args.target)
    if kind == "optimizers":
        args.confirm = verdict.parse_confirm_seeds(args.confirm_seeds)
        verdict.check_confirm_seeds(spec.seeds, args.confirm)
    return spec, args, executor


def media_dir(args) -> Path:
    if args.media is not None:
        return Path(args.media)
    return Path(DEFAULT_MEDIA) if args.out == DEFAULT_OUT[args.kind] else Path(args.out) / "media"


def save_figures(out: Path, media: Path) -> None:
    from sweeps.plot import save_figures as draw  # matplotlib: only where figures are drawn
    for path in draw(out, media):
        print(f"saved {path}")


def main_cli(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(sweeps.__doc__.strip() + "\n")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in DEFAULT_OUT:
            spec, args, executor = parse_sweep_args(command, rest)
            args.kind = command
            if getattr(args, "from_results", None):
                for name in spec.optimizers:
                    taken = ", ".join(f"{k.split('.')[-1]}={v[0]}" for k, v in spec.search.get(name, {}).items())
                    print(f"{name}: best configuration in {args.from_results}: {taken}")
            if command == "optimizers":
                status = verdict.run_optimizer_sweep(spec, Path(args.out), executor, args.dry_run, argv, args.target,
                                                     args.extend, args.extend_rounds, args.confirm)
            else:
                status = run_sweep(spec, Path(args.out), executor, args.dry_run, argv, args.target)
            if not (args.no_plot or args.dry_run) and results.load_rows(Path(args.out)):
                save_figures(Path(args.out), media_dir(args))
            return status
        if command in ("table", "plot"):
            parser = ArgumentParser(prog=f"python -m sweeps {command}", allow_abbrev=False)
            parser.add_argument("dir", help="a sweep directory (holding runs/)")
            if command == "table":
                add_target_flag(parser)
            else:
                parser.add_argument("--media", default=None, help="figure directory (default: DIR/media)")
            args = parser.parse_args(rest)
            out = Path(args.dir)
            if not (out / "runs").is_dir():
                raise ValueError(f"{out} is not a sweep directory (no runs/)")
            if command == "table":
                target = results.parse_target(args.target)
                found = verdict.rebuild(out, verdict.KEEP if target is None else target)
                rows = results.read_table(out / "results.csv")
                points = results.summarize(rows)
                for point in points:
                    print(results.describe(point))
                print(f"{len(rows)} finished runs, {len(points)} points -> {out / 'results.csv'}, {out / 'points.csv'}")
                if found is not None:
                    verdict.print_verdict(found)
            else:
                verdict.rebuild(out)
                save_figures(out, Path(args.media) if args.media else out / "media")
            return 0
        raise ValueError(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; unfinished runs will be redone on the next invocation", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main_cli())

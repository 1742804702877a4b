"""Command line of the sweeps: ``python -m sweeps {optimizers,architecture,table,plot} ...``."""
import argparse
import sys
from pathlib import Path

import main
import sweeps
from sweeps import runner

COMMANDS = ("optimizers", "architecture", "table", "plot")
DEFAULT_OUT = {"optimizers": "runs/optimizers", "architecture": "runs/architecture"}
DEFAULT_MEDIA = "media"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``error: ...``) with exit status 2."""

    def error(self, message):
        raise ValueError(message)


def parse_list(flag: str, text: str) -> list:
    """``"1e-3,3e-3"`` -> ``[0.001, 0.003]``; items are Python literals or strings, as in main.py."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ValueError(f"malformed list {flag} {text!r}: empty item")
    return [main.parse_value(item) for item in items]


def sweep_parser(kind: str) -> Parser:
    parser = Parser(prog=f"python -m sweeps {kind}", allow_abbrev=False,
                    description=f"Run the {kind} sweep (see sweeps/{kind}.py). A flag given replaces that axis "
                                "of the grid; comma lists sweep several values.",
                    epilog="Any config field is also an axis as --section.field=v1,v2 (e.g. --model.mlp_ratio=2,4). "
                           "Finished runs are skipped; unfinished ones are redone.")
    for flag, (key, _) in main.FLAGS.items():
        if key in ("optim.name", "seed"):
            continue
        parser.add_argument(flag, *main.SHORT_FLAGS.get(flag, []), dest=key, default=None, metavar="V[,V...]",
                            help=f"{key}")
    parser.add_argument("--optimizers", "--optimizer", dest="optim.name", default=None, metavar="NAME[,NAME...]",
                        help="optimizers to sweep (default: every registered one)")
    parser.add_argument("--seeds", "--seed", dest="seed", default=None, metavar="S[,S...]", help="seeds")
    if kind == "architecture":
        parser.add_argument("--from-results", metavar="DIR", default=None,
                            help="take each optimizer's best configuration from an optimizer sweep's directory")
    parser.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process (default: 1)")
    parser.add_argument("--out", default=DEFAULT_OUT[kind], help="sweep directory (default: %(default)s)")
    parser.add_argument("--media", default=None,
                        help=f"figure directory (default: {DEFAULT_MEDIA}/ with the default --out, else OUT/media)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw figures")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and what is already done; run nothing")
    return parser


def parse_sweep_args(kind: str, argv: list) -> tuple:
    """``(spec, args)`` from a sweep command line; ValueError for bad input."""
    parser = sweep_parser(kind)
    args, rest = parser.parse_known_args(argv)
    axes = {}
    for key, text in vars(args).items():
        if text is not None and (key == "seed" or "." in key):
            flag = next((f for f, (k, _) in main.FLAGS.items() if k == key), None) or f"--{key}"
            axes[key] = parse_list("--optimizers" if key == "optim.name" else "--seeds" if key == "seed" else flag,
                                   text)
    i = 0
    while i < len(rest):  # --section.field=v1,v2 or --section.field v1,v2 (as main.py's CLI)
        token = rest[i]
        if not token.startswith("--") or "." not in token:
            raise ValueError(f"unrecognized argument {token!r}")
        key, eq, text = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ValueError(f"{token} needs a value")
            text, i = rest[i + 1], i + 1
        axes[key] = parse_list(f"--{key}", text)
        i += 1
    if args.workers < 1:
        raise ValueError(f"--workers={args.workers} must be >= 1")
    spec = runner.default_spec(kind)
    if getattr(args, "from_results", None):
        spec.optim_by_name = runner.best_from_results(Path(args.from_results))
        if "optim.name" not in axes:
            spec.optimizers = [n for n in runner.OPTIMIZERS if n in spec.optim_by_name]
        missing = [n for n in axes.get("optim.name", []) if n not in spec.optim_by_name]
        if missing:
            raise ValueError(f"{args.from_results} has no results for {', '.join(map(str, missing))}")
    spec = runner.apply_axes(spec, axes)
    runner.expand(spec)  # validate every config before anything runs
    return spec, args


def media_dir(args) -> Path:
    if args.media is not None:
        return Path(args.media)
    return Path(DEFAULT_MEDIA) if args.out == DEFAULT_OUT[args.kind] else Path(args.out) / "media"


def usage() -> str:
    return sweeps.__doc__.strip() + "\n"


def main_cli(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_run":  # a worker process (see runner.execute)
        return runner.worker_main(*argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in DEFAULT_OUT:
            spec, args = parse_sweep_args(command, rest)
            args.kind = command
            for name, axes in spec.optim_by_name.items():
                if name in spec.optimizers:
                    taken = ", ".join(f"{k.split('.')[-1]}={v[0]}" for k, v in axes.items() if runner.uses(name, k))
                    print(f"{name}: best configuration in {args.from_results}: {taken}")
            media = None if args.no_plot else media_dir(args)
            return runner.run_sweep(spec, Path(args.out), args.workers, args.dry_run, media, argv)
        if command in ("table", "plot"):
            parser = Parser(prog=f"python -m sweeps {command}", allow_abbrev=False)
            parser.add_argument("dir", help="a sweep directory (holding runs/)")
            if command == "table":
                parser.add_argument("--target", type=float, default=None,
                                    help="target validation accuracy (default: each run's early stop, else 0.9)")
            else:
                parser.add_argument("--media", default=None, help="figure directory (default: DIR/media)")
            args = parser.parse_args(rest)
            out = Path(args.dir)
            if not (out / "runs").is_dir():
                raise ValueError(f"{out} is not a sweep directory (no runs/)")
            if command == "table":
                rows = runner.rebuild_table(out, args.target)
                points = runner.summarize(rows)
                for point in points:
                    print(runner.describe(point))
                print(f"{len(rows)} finished runs, {len(points)} points -> {out / 'results.csv'}, {out / 'points.csv'}")
            else:
                from sweeps.plot import save_figures
                runner.rebuild_table(out)
                for path in save_figures(out, Path(args.media) if args.media else out / "media"):
                    print(f"saved {path}")
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

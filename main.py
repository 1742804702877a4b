"""Train the grokking transformer: ``python main.py [flags]`` (see README). Flags -> Config -> train -> figures."""
import fastblas  # noqa: F401  (before mlx: loads an optimized BLAS on Linux)

import json
import sys
from pathlib import Path

from config import (PRESETS, ArgumentParser, Config, add_knob_flags, check_out_dir, config_from_dict, merge_overrides,
                    override, parse_dotted, parse_value, preset)
from training import checkpoints, rundir
from training.loop import config_differences, train


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description="Train a transformer on a ∘ b mod p and watch it grok.",
        epilog="Any config field can also be set as --section.field=value, e.g. --optim.lr=3e-3 "
               "(sections: data, model, optim, train; see README). Intervals: N (epochs), Nsteps, log:N "
               "(N log-spaced steps over the budget) or off.")
    add_knob_flags(parser)
    parser.add_argument("--preset", default=None, help=f"a paper's setting: {', '.join(PRESETS)} (flags beside it win)")
    parser.add_argument("--out", default="runs/default", help="run directory for results (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--checkpoint-every", default="10", metavar="INTERVAL",
                        help="resumable checkpoints (default: every %(default)s epochs, and at the end)")
    parser.add_argument("--snapshot-every", default="auto", metavar="INTERVAL",
                        help="parameter snapshots for analysis (default auto: every 5 epochs, or 60 log-spaced "
                             "snapshots when the budget is over 500 epochs or given in steps)")
    parser.add_argument("--plot", default="media/grokking.png",
                        help="figure path; a _dark variant is saved beside it (default: %(default)s)")
    parser.add_argument("--x-axis", choices=("auto", "linear", "log"), default="auto",
                        help="the figure's step axis (auto: log when the run spans more than two decades of steps)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw figures")
    return parser


def parse_args(argv):
    """``(config, args)`` from command-line arguments: the knob flags plus ``--section.field=value``; with
    ``--resume``, the run's saved config (flags may not change it)."""
    args, rest = build_parser().parse_known_args(argv)
    check_out_dir(args.out)
    texts = {k: v for k, v in vars(args).items() if ("." in k or k == "seed") and v is not None}
    texts.update(parse_dotted(rest))
    overrides = merge_overrides(preset(args.preset) if args.preset else {},
                                {k: parse_value(v) for k, v in texts.items()})
    args.checkpoint_every = checkpoints.Interval.parse(args.checkpoint_every, "--checkpoint-every")
    if not args.resume:
        config = override(Config(), overrides)
        args.snapshot_every = snapshot_interval(args.snapshot_every, config)
        return config, args
    out = Path(args.out)
    if not checkpoints.checkpoint_dirs(out) or not (out / rundir.CONFIG).exists():
        raise ValueError(f"--resume: no checkpoint in {out} (nothing to resume)")
    saved = rundir.read_json(out / rundir.CONFIG)
    config = override(config_from_dict(saved), overrides)
    changed = config_differences(saved, config)
    if changed:
        raise ValueError(f"--resume with flags that change the run's config: {'; '.join(changed)}")
    args.snapshot_every = snapshot_interval(args.snapshot_every, config)
    return config, args


def snapshot_interval(text: str, config: Config):
    """``--snapshot-every``: ``auto`` keeps a long run's snapshots to 60, spread log-uniformly over its steps."""
    if text != "auto":
        return checkpoints.Interval.parse(text, "--snapshot-every")
    train = config.resolved().train
    short = train.steps is None and train.epochs <= 500
    return checkpoints.Interval("epochs", 5) if short else checkpoints.Interval("log", 60)


def main(argv=None) -> int:
    try:
        config, args = parse_args(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.resume and rundir.is_finished(args.out):
        print(f"{args.out} is finished; nothing to resume")
        summary = rundir.read_json(Path(args.out) / rundir.SUMMARY)
    else:
        try:
            summary = train(config, args.out, checkpoint_every=args.checkpoint_every,
                            snapshot_every=args.snapshot_every, resume=args.resume, require_checkpoint=args.resume)
        except checkpoints.CheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    print(json.dumps({k: summary[k] for k in ("final_train_acc", "final_val_acc", "epochs_to_90", "epochs_to_99",
                                              "steps_to_99", "diverged", "wall_s", "ms_per_step")}))
    print(f"results in {args.out}/")
    if not args.no_plot:
        import plot
        for path in plot.plot_run(args.out, args.plot, args.x_axis):
            print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

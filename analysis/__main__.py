"""``python -m analysis RUN_DIR [--factor 2] [--max-key 8] [--level 0.5] [--chunk 4096] [--no-figures]``."""
import argparse
import sys

from .run import AnalysisError, analyse_run


def main(argv=None) -> int:
    """Analyse one run directory; bad input prints ``error: ...`` on stderr and returns 2."""
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    parser.add_argument("run_dir", help="a run directory with config.json, metrics.jsonl and snapshots/")
    parser.add_argument("--factor", type=float, default=2.0,
                        help="key frequencies: embedding Fourier norm above this many times the median")
    parser.add_argument("--max-key", type=int, default=8, help="at most this many key frequencies")
    parser.add_argument("--level", type=float, default=0.5, help="loss level whose first crossing is reported")
    parser.add_argument("--chunk", type=int, default=4096, help="rows per forward pass")
    parser.add_argument("--no-figures", action="store_true", help="write only analysis.jsonl and analysis.json")
    args = parser.parse_args(argv)
    try:
        s = analyse_run(args.run_dir, args.factor, args.max_key, args.level, args.chunk, not args.no_figures)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ph = s["phases"]
    print(f"{s['snapshots']} snapshots in {s['seconds']:.1f} s; {s['group']['name']}; key frequencies "
          f"{s['key_frequencies']} ({s['key_rule']['share']:.0%} of the embedding's squared norm); restricted loss < {ph['level']:g} "
          f"at epoch {ph['restricted_loss_below_level_epoch']}, validation ≥ 99 % at epoch "
          f"{ph['val_acc_99_epoch']}; wrote {', '.join(s['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

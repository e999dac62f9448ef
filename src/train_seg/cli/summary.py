"""``python -m train_seg.cli.summary <sweep dir> [--rare-share S] [--baseline O]`` (``train-seg-summary``): writes
summary.csv, summary.md and summary.png into a sweep directory (``train_seg.reporting.summary``) and prints a short
table. Exit status 0, or 2 for a missing directory, a bad option or a directory with no job (nothing written).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from train_seg.cli import args
from train_seg.config.command_line import exit_with_user_error

PROG = "train_seg.cli.summary"


def parser() -> args.Parser:
    """The command line of ``python -m train_seg.cli.summary``."""
    p = args.make_parser(PROG, "Summarise a sweep (a Hydra multirun directory, finished or not): writes summary.csv, "
                               "summary.md and summary.png into it, one row per job, failed and unfinished jobs "
                               "included.")
    p.add_argument("sweep_dir", type=Path, help="the multirun directory, e.g. outputs/multirun/2024-01-01/12-00-00")
    p.add_argument("--rare-share", type=args.number(0.0, 1.0, open_low=True, open_high=True), default=None,
                   metavar="S", help="a class is rare when its training pixel share is below this, e.g. 0.01 "
                                     "(default: the jobs' rare_share)")
    p.add_argument("--baseline", default=None, metavar="OVERRIDES",
                   help="the configuration the others are compared with, e.g. 'weighting=none' or 'loss=ce "
                        "weighting=none' (default: the first with weighting=none or loss=ce among the swept keys)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train_seg.cli.summary`` / ``train-seg-summary``; returns the exit status 0 (2 exits)."""
    from train_seg.reporting import record
    from train_seg.reporting.summary import FILES, console_table, find_job_dirs, write_summary

    options = parser().parse_args(argv)
    if not options.sweep_dir.is_dir():
        exit_with_user_error(PROG, ValueError(f"{options.sweep_dir} is not a directory; give a sweep (multirun) "
                                              "directory."))
    if not find_job_dirs(options.sweep_dir):
        exit_with_user_error(PROG, ValueError(f"no job directory (with .hydra/overrides.yaml or {record.FILENAME}) "
                                              f"under {options.sweep_dir}; give a sweep (multirun) directory."))
    summary = write_summary(options.sweep_dir, options.rare_share, options.baseline)
    print(console_table(summary))
    print("wrote " + ", ".join(str(summary.sweep_dir / name) for name in FILES))
    return 0


if __name__ == "__main__":
    sys.exit(main())

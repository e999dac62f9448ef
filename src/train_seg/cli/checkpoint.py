"""``python -m train_seg.cli.checkpoint convert OLD NEW`` (``train-seg-checkpoint``): rewrites an older train_seg
checkpoint as one ``torch.load(weights_only=True)`` reads (``train_seg.checkpoint.convert``; it unpickles the old
file: run it on files you trust only). Exit status 0, or 2 for bad arguments or a file that cannot be converted.
"""
from __future__ import annotations

import sys
from typing import Sequence

from train_seg.cli import args
from train_seg.config.command_line import USER_ERRORS, exit_with_user_error

PROG = "train_seg.cli.checkpoint"


def parser() -> args.Parser:
    """The command line of ``python -m train_seg.cli.checkpoint``."""
    p = args.make_parser(PROG, "Checkpoint maintenance. convert: an older train_seg checkpoint -> one "
                               "torch.load(weights_only=True) reads (it unpickles OLD: run it on files you trust "
                               "only).")
    commands = p.add_subparsers(dest="command", required=True, metavar="convert",
                                parser_class=lambda **kw: args.Parser(PROG, **kw))
    convert = commands.add_parser("convert", help="rewrite OLD as NEW, which the safe loader reads")
    convert.add_argument("old", type=args.text, metavar="OLD", help="the older checkpoint file")
    convert.add_argument("new", type=args.text, metavar="NEW", help="the file to write (must not exist)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train_seg.cli.checkpoint convert OLD NEW``; returns 0 (2 exits)."""
    from train_seg.checkpoint import convert

    options = parser().parse_args(argv)
    try:
        print(f"converted {options.old} -> {convert(options.old, options.new)}")
    except USER_ERRORS as exc:
        exit_with_user_error(PROG, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

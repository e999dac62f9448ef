"""``python -m train_seg.cli.stats [overrides]``: class statistics of the training split and the class weights of
every weighting scheme side by side, for the same config overrides as training (e.g. ``dataset=voc
dataset.root=...``). Nothing is trained and no run directory is written (only the statistics cache).
"""
from __future__ import annotations

import sys
from typing import Sequence

from train_seg.cli import args
from train_seg.config.command_line import USER_ERRORS, compose, exit_with_user_error

PROG = "train_seg.cli.stats"


def report(cfg) -> str:
    """The text printed by the command: split size, ignored pixels, and the weight table of every scheme."""
    from omegaconf import OmegaConf

    from train_seg.engine import builder as build
    from train_seg.data.class_stats import compute_class_stats
    from train_seg.losses.weighting import all_scheme_weights, class_weights, format_weight_table

    source = build.build_source(cfg.dataset, "train")
    source.validate()
    stats = compute_class_stats(source, cache_dir=cfg.paths.cache_dir, progress=bool(cfg.trainer.progress))
    normalize = cfg.weighting.normalize
    columns = dict(all_scheme_weights(stats, normalize=normalize))
    columns[f"selected ({cfg.weighting.scheme})"] = class_weights(stats, **OmegaConf.to_container(cfg.weighting, resolve=True))
    rare = [n for n, s in zip(source.class_names, stats.pixel_share) if s < float(cfg.rare_share)]
    return "\n".join([
        f"dataset {cfg.dataset.get('name', '?')}: train split, {stats.num_images} images, {stats.total_pixels} labelled "
        f"pixels, {stats.ignored_pixels} ignored",
        f"weights normalised by '{normalize}' (default parameters per scheme; the last column is the config's "
        f"`weighting`)",
        "",
        format_weight_table(source.class_names, stats, columns),
        "",
        f"rare classes (pixel share < rare_share={cfg.rare_share}): {', '.join(rare) or 'none'}",
    ])


def parser() -> args.Parser:
    """The command line of ``python -m train_seg.cli.stats``."""
    p = args.make_parser(PROG, "Class statistics of the training split and every weighting scheme's class weights, "
                               "for the same Hydra overrides as training (e.g. dataset=voc "
                               "dataset.root=/data/VOCdevkit).")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m train_seg")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m train_seg.cli.stats`` / ``train-seg-stats``; exit status 0 or 2 (bad input)."""
    overrides = parser().parse_args(argv).overrides
    try:
        print(report(compose(overrides)))
    except USER_ERRORS as exc:
        exit_with_user_error(PROG, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

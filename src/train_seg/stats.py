"""``python -m train_seg.stats [overrides]``: class statistics of the training split and the class weights of
every weighting scheme side by side, for the same config overrides as training (e.g. ``dataset=voc
dataset.root=...``). Nothing is trained and no run directory is written (only the statistics cache).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra
from omegaconf import DictConfig, OmegaConf

from train_seg.__main__ import CONFIG_DIR, USER_ERRORS


def report(cfg: DictConfig) -> str:
    """The text printed by the command: split size, ignored pixels, and the weight table of every scheme."""
    from train_seg import build
    from train_seg.data.stats import compute_class_stats
    from train_seg.weighting import all_scheme_weights, class_weights, format_weight_table

    source = build.build_source(cfg.dataset, "train")
    source.validate()
    stats = compute_class_stats(source, cache_dir=cfg.paths.cache_dir, progress=bool(cfg.trainer.progress))
    normalize = cfg.weighting.normalize
    columns = {name: w for name, w in all_scheme_weights(stats, normalize=normalize).items()}
    selected = class_weights(stats, **OmegaConf.to_container(cfg.weighting, resolve=True))
    columns[f"selected ({cfg.weighting.scheme})"] = selected
    rare = [n for n, s in zip(source.class_names, stats.pixel_share) if s < float(cfg.rare_share)]
    lines = [
        f"dataset {cfg.dataset.get('name', '?')}: train split, {stats.num_images} images, {stats.total_pixels} labelled "
        f"pixels, {stats.ignored_pixels} ignored",
        f"weights normalised by '{normalize}' (default parameters per scheme; the last column is the config's "
        f"`weighting`)",
        "",
        format_weight_table(source.class_names, stats, columns),
        "",
        f"rare classes (pixel share < rare_share={cfg.rare_share}): {', '.join(rare) or 'none'}",
    ]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        print(report(cfg))
    except USER_ERRORS as exc:
        print(f"train_seg.stats: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    main()

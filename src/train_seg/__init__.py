"""train_seg: DeepLabV3 segmentation training for class-imbalanced data (``python -m train_seg``).

Importing the package registers the typed config schemas (``train_seg.config.schema``) in Hydra's ConfigStore: the YAML
files of configs/ extend them, so compose the configs after ``import train_seg``. This import stays light (no torch).
"""
import os
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("train_seg")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# albumentations checks PyPI for a newer release at import: never from this package (set once, before any import)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from train_seg.config.naming import register_resolvers  # noqa: E402
from train_seg.config.schema import register_schemas  # noqa: E402

register_schemas()
register_resolvers()


def __getattr__(name: str):
    """Lazy exports, so that ``import train_seg`` stays torch-free: ``train_seg.load_checkpoint_model``."""
    if name == "load_checkpoint_model":
        from train_seg.checkpoint import load_checkpoint_model

        return load_checkpoint_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

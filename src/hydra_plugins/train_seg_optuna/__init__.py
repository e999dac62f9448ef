"""Hydra instantiates sweepers only from classes defined under the ``hydra_plugins`` namespace: this is train_seg's
Optuna sweeper (``train_seg.search.sweeper.OptunaSearch``) under the name ``hydra_plugins.train_seg_optuna.OptunaSweeper``
that ``configs/hydra/sweeper/train_seg_optuna.yaml`` names."""
from train_seg.search.sweeper import OptunaSearch


class OptunaSweeper(OptunaSearch):
    """``hparams_search=optuna``'s sweeper; see ``train_seg.search.sweeper``."""


__all__ = ["OptunaSweeper"]

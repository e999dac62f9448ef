"""Hyperparameter search on Optuna (``-m hparams_search=optuna``, extra ``.[optuna]``).

``study``: where a study is stored (``storage_url``, ``open_storage``) and how a trial's training job reports each
evaluation to it and learns that it is pruned (``TrialReporter``, ``TrialPruned``). ``sweeper``: the Hydra sweeper
that asks Optuna for trials, launches them through any Hydra launcher and tells the results
(``hydra_plugins.train_seg_optuna.OptunaSweeper`` is its registered name). Importing this package imports no Optuna.
"""

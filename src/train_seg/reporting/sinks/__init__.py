"""Sinks: where the training loop's events go (see ``train_seg.reporting.events`` for the events and their order).

* ``ConsoleSink`` (``logger.console``): the class-weight table, the per-class table of every evaluation.
* ``TensorBoardSink`` (``logger.tensorboard``): scalars, custom-scalars layout, hparams, confusion image, overlays.
* ``MLflowSink`` (``logger.mlflow``, ``logger=mlflow``; extra ``train_seg[mlflow]``): params, metrics, artifacts, status.
* ``RunFilesSink`` (always on, last): checkpoints (``last.pt``, ``best.pt``) and ``metrics.json`` (the run record).

``logger`` in the config is a mapping ``name -> {_target_: <class>, <constructor keys>}``; a null entry is off
(``logger.tensorboard=null``), and ``+logger.<name>._target_=my.module.MySink`` adds a user's own sink.
"""
from train_seg.reporting.sinks.console import ConsoleSink
from train_seg.reporting.sinks.mlflow import MLflowSink  # imports mlflow only when built
from train_seg.reporting.sinks.run_files import RunFilesSink
from train_seg.reporting.sinks.tensorboard import TensorBoardSink

__all__ = ["ConsoleSink", "MLflowSink", "RunFilesSink", "TensorBoardSink"]

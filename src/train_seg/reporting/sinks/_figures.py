"""Figures that more than one sink draws from the same event."""
from __future__ import annotations

from train_seg.reporting.events import EvalResult


def per_class_figure(result: EvalResult, rare_share: float):
    """IoU against training pixel share (log x) beside recall and precision bars, from one evaluation."""
    from train_seg.reporting.figures import per_class_figure as draw

    metrics = result.metrics
    return draw(result.class_names, result.pixel_share, metrics["iou"].tolist(), metrics["precision"].tolist(),
                metrics["recall"].tolist(), title=f"epoch {result.epoch}, step {result.step}", rare_share=rare_share)

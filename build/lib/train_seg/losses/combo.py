"""Weighted sum of named loss terms: any combination from config without a class per pair."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from torch import Tensor, nn

__all__ = ["WeightedSum"]


class WeightedSum(nn.Module):
    """``L = sum_name weights[name] * terms[name](logits, target)``.

    Args:
        terms: mapping name -> already-built loss module (each called as ``term(logits, target)``); stored in
            an ``nn.ModuleDict`` so ``.to(device)`` moves their buffers. Names must be valid ModuleDict keys
            (non-empty strings without ".").
        weights: mapping name -> finite float; a term without an entry gets 1.0; an entry naming no term is a
            ValueError (a typo would otherwise silently weight nothing).

    After every forward, ``last_terms`` holds the *unweighted* value of each term, detached (no host sync: the
    trainer logs them as ``train/loss/<name>``). Each term applies its own reduction, ``ignore_index`` and
    class weights; this module adds nothing else.

    What it is, its terms decide: ``binary`` (an instance property) is True when every term is a binary loss
    (a term without a ``binary`` attribute counts as multi-class; a mix of both runs on no head). It takes no
    ``weight`` itself (``takes_class_weights = False``): the builder gives the class weights to each term.
    """

    takes_class_weights = False

    def __init__(self, terms: Mapping[str, nn.Module], weights: Mapping[str, float] | None = None):
        super().__init__()
        name = type(self).__name__
        if not isinstance(terms, Mapping) or len(terms) == 0:
            raise ValueError(f"{name}: terms must be a non-empty mapping name -> loss module, got {terms!r}")
        for key, term in terms.items():
            if not isinstance(key, str) or not key or "." in key:
                raise ValueError(f"{name}: term names must be non-empty strings without '.', got {key!r}")
            if not isinstance(term, nn.Module):
                raise ValueError(f"{name}: term {key!r} must be an nn.Module (a built loss), got "
                                 f"{type(term).__name__}")
        weights = {} if weights is None else weights
        if not isinstance(weights, Mapping):
            raise ValueError(f"{name}: weights must be a mapping name -> float, got {weights!r}")
        unknown = [key for key in weights if key not in terms]
        if unknown:
            raise ValueError(f"{name}: weights given for unknown term(s) {unknown}; terms are {list(terms)}")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights: dict[str, float] = {}
        for key in terms:
            value = weights.get(key, 1.0)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name}: weight of term {key!r} must be a finite number, got {value!r}")
            self.weights[key] = float(value)
        self.last_terms: dict[str, Tensor] = {}

    @property
    def binary(self) -> bool:
        """True when every term is a binary (one-channel) loss, i.e. the sum is for a one-channel head."""
        return all(getattr(term, "binary", False) is True for term in self.terms.values())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        values = {key: term(logits, target) for key, term in self.terms.items()}
        self.last_terms = {key: value.detach() for key, value in values.items()}
        total = None
        for key, value in values.items():
            scaled = value * self.weights[key]
            total = scaled if total is None else total + scaled
        return total

    def extra_repr(self) -> str:
        return "weights=" + ", ".join(f"{key}={value:g}" for key, value in self.weights.items())

"""``SegmentationLoss``: what every loss class of :mod:`train_seg.losses` shares, and what it declares about itself.

A loss class declares, as class attributes:

* ``binary`` -- True for one-channel sigmoid losses (logits ``(N, 1, H, W)``, class-weight vector
  ``[w_bg, w_fg]``), False for multi-class softmax losses (logits ``(N, C, H, W)``, one weight per class). The
  config check pairs ``model.binary_head`` with the losses by this attribute.
* ``takes_class_weights`` -- True exactly when the constructor accepts ``weight``, the class-weight vector the
  builder injects (``train_seg.build``); such a class keeps it as the non-persistent buffer ``self.weight``
  (None when not given), so ``.to(device)`` moves it and checkpoints do not store it.
* ``repr_fields`` -- the attribute names shown by ``repr``, in order.

The base constructor validates ``ignore_index`` (an int, stored as ``self.ignore_index``) and, when
``takes_class_weights``, the ``weight`` vector (finite, >= 0, not all zero; exactly 2 entries when ``binary``).
"""

from __future__ import annotations

from torch import Tensor, nn

from ._checks import as_class_vector, check_ignore_index, check_inputs

__all__ = ["SegmentationLoss"]


class SegmentationLoss(nn.Module):
    """Base class of the segmentation losses, called as ``loss(logits, target)`` (see the module docstring).

    Subclasses call ``super().__init__(ignore_index=..., weight=...)`` (``weight`` only if they take class
    weights), validate their own arguments, and in ``forward`` call :meth:`check_inputs` before the math.
    """

    binary: bool = False
    takes_class_weights: bool = False
    repr_fields: tuple[str, ...] = ("ignore_index",)

    def __init__(self, ignore_index: int = 255, weight=None):
        super().__init__()
        self.ignore_index = check_ignore_index(self.owner, ignore_index)
        if self.takes_class_weights:
            vector = as_class_vector(self.owner, "weight", weight, length=2 if self.binary else None)
            self.register_buffer("weight", vector, persistent=False)
        elif weight is not None:
            raise TypeError(f"{self.owner}: takes_class_weights is False, so it has no weight argument")

    @property
    def owner(self) -> str:
        """The class name, which starts every error message."""
        return type(self).__name__

    def check_inputs(self, logits: Tensor, target: Tensor, **class_vectors) -> None:
        """Shape and dtype checks of ``forward(logits, target)`` (one-channel logits when ``binary``); the
        ``weight`` buffer and any other ``class_vectors`` must have one entry per class. Never syncs the device."""
        if self.takes_class_weights:
            class_vectors = {"weight": self.weight, **class_vectors}
        check_inputs(self.owner, logits, target, binary=self.binary, **class_vectors)

    def _repr_field(self, name: str) -> str:
        """The text of field ``name`` in ``repr``: floats as ``:g``, strings and tuples as ``repr``, else ``str``."""
        value = getattr(self, name)
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, (str, tuple)):
            return repr(value)
        return str(value)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={self._repr_field(name)}" for name in self.repr_fields)

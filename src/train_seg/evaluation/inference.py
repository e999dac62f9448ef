"""Use a trained model (``train_seg.checkpoint.load_checkpoint_model``): infer logits (whole image, sliding windows,
test-time augmentation) and predict a label mask from a numpy image (``predict``, the one prediction function).
Every forward pass goes through ``train_seg.evaluation.loop.predict_batch``.

Contracts (the full conventions are in docs/using-a-model.md):
``to_model_input`` gives ``(N, 3, H, W)`` float32 normalised exactly as the checkpoint's val pipeline (grey, grey +
alpha, RGBA, uint8/uint16/float inputs; other dtypes raise ``ValueError``). Every inference path returns float32
logits at the input's size, on the inference device or ``accumulate_device``. Sliding windows cover every pixel
(the last window flush with the border, small images zero-padded then cropped) and blend window logits by an
importance map (``uniform`` or ``gaussian``, never 0). Test-time augmentation averages logits (not probabilities)
over scales and flips. ``InferenceSettings`` is the one description of these choices, checked when built."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train_seg.checkpoint import CheckpointMeta
from train_seg.evaluation.loop import predict_batch
from train_seg.evaluation.metrics import predictions

__all__ = ["InferenceSettings", "TTA", "infer_logits", "predict", "slide_logits", "tta_logits", "to_model_input",
           "whole_logits"]

MODES = ("whole", "slide")
BLENDS = ("uniform", "gaussian")
GAUSSIAN_SIGMA = 1.0 / 8.0  # of the window side (nnU-Net's choice)


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: ``flip`` adds the horizontally flipped image; ``scales`` are input scales."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)


# -- numpy images to model input -------------------------------------------------------------------------------
def as_rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB on the uint8 scale: uint8 as is, anything else float32 (see the module docstring)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"image of shape {array.shape}: expected (H, W) grey, or (H, W, C) with C = 1 (grey), "
                         "2 (grey + alpha), 3 (RGB) or 4 (RGBA).")
    array = array[..., :1] if array.shape[-1] in (1, 2) else array[..., :3]
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) * np.float32(255.0 / 65535.0)
    elif array.dtype == np.bool_ or np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32) * np.float32(255.0)
    else:
        raise ValueError(f"image dtype {array.dtype}: expected uint8, uint16, or float in [0, 1]; convert it first.")
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def normalize_image(rgb: np.ndarray, meta: CheckpointMeta) -> np.ndarray:
    """``(H, W, 3)`` on the uint8 scale -> float32 as albumentations ``Normalize`` computes it (same float32 ops)."""
    mean = np.array(meta.mean, dtype=np.float32) * meta.max_pixel_value
    denominator = np.reciprocal(np.array(meta.std, dtype=np.float32) * meta.max_pixel_value)
    out = rgb.astype(np.float32)
    out -= mean
    out *= denominator
    return out


def to_model_input(image: np.ndarray, meta: CheckpointMeta) -> torch.Tensor:
    """A numpy image ``(H, W[, C])`` -> the model's input ``(1, 3, H, W)`` float32 (conversions: module docstring)."""
    return torch.from_numpy(normalize_image(as_rgb(image), meta)).permute(2, 0, 1).unsqueeze(0).contiguous()


# -- inference -------------------------------------------------------------------------------------------------
def _as_batch(images: torch.Tensor) -> torch.Tensor:
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"images of shape {tuple(images.shape)}: expected (N, C, H, W) or (C, H, W).")
    return images


def _pair(value, name: str) -> tuple[int, int]:
    """``(h, w)`` from a positive int or a pair of them."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else value
    ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in pair)
    if not ok:
        raise ValueError(f"{name}={value!r}: expected a positive number of pixels or [height, width].")
    return int(pair[0]), int(pair[1])


def _resized(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """float32 logits at ``size`` (bilinear, as DeepLabV3's own upsampling) when they are not already."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window origins along an axis of ``size >= window``: every ``stride`` px, the last flush with the border."""
    last = size - window
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def importance_map(window: tuple[int, int], blend: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(h, w)`` float32 weight of each window pixel: ones (``uniform``) or a Gaussian (``gaussian``, module
    docstring)."""
    if blend not in BLENDS:
        raise ValueError(f"blend={blend!r}: choose one of {', '.join(BLENDS)}.")
    if blend == "uniform":
        return torch.ones(window, dtype=torch.float32, device=device)

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (n * GAUSSIAN_SIGMA)) ** 2)

    weights = torch.outer(axis(window[0]), axis(window[1]))
    return (weights / weights.max()).to(device, torch.float32)


@torch.inference_mode()
def whole_logits(model: nn.Module, images: torch.Tensor, device: str | torch.device = "cpu",
                 amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> torch.Tensor:
    """One forward pass of the whole batch: float32 logits ``(N, K, H, W)`` at the input size, on the device."""
    images = _as_batch(images)
    return _resized(predict_batch(model, images, torch.device(device), amp_dtype, channels_last), images.shape[-2:])


@torch.inference_mode()
def slide_logits(model: nn.Module, images: torch.Tensor, window, stride=None, device: str | torch.device = "cpu",
                 amp_dtype: torch.dtype | None = None, channels_last: bool = False, batch_size: int = 1,
                 blend: str = "uniform", accumulate_device: str | torch.device | None = None) -> torch.Tensor:
    """Sliding-window logits of ``images`` ``(N, C, H, W)`` (or ``(C, H, W)``): float32 ``(N, K, H, W)`` on
    ``accumulate_device`` (default: ``device``). ``window``/``stride``: pixels or ``[h, w]``; stride None = half the
    window. Tiling, padding, blending and memory: module docstring. The caller puts the model in eval mode."""
    images, device = _as_batch(images), torch.device(device)
    acc = torch.device(accumulate_device) if accumulate_device is not None else device
    wh, ww = _pair(window, "window")
    sh, sw = _pair(stride, "stride") if stride is not None else (max(1, wh // 2), max(1, ww // 2))
    if sh > wh or sw > ww:
        raise ValueError(f"stride {sh}x{sw} is larger than the window {wh}x{ww}: pixels between windows would get no "
                         "prediction; use a stride <= the window.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1 (windows per forward pass).")
    n, _, h, w = images.shape
    if h < wh or w < ww:  # zeros after normalisation: the mean colour
        images = F.pad(images, (0, max(0, ww - w), 0, max(0, wh - h)))
    ph, pw = images.shape[-2:]
    origins = [(y, x) for y in window_starts(ph, wh, sh) for x in window_starts(pw, ww, sw)]
    weight = importance_map((wh, ww), blend, acc)
    norm = torch.zeros((ph, pw), dtype=torch.float32, device=acc)
    for y, x in origins:
        norm[y:y + wh, x:x + ww] += weight
    tasks = [(i, y, x) for i in range(n) for y, x in origins]
    total = None
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start:start + batch_size]
        crops = torch.stack([images[i, :, y:y + wh, x:x + ww] for i, y, x in chunk])
        logits = _resized(predict_batch(model, crops, device, amp_dtype, channels_last), (wh, ww)).to(acc)
        logits.mul_(weight)
        if total is None:
            total = torch.zeros((n, logits.shape[1], ph, pw), dtype=torch.float32, device=acc)
        for (i, y, x), tile in zip(chunk, logits):
            total[i, :, y:y + wh, x:x + ww] += tile
    total.div_(norm)
    return total if (ph, pw) == (h, w) else total[..., :h, :w].contiguous()


def _scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    return tuple(max(1, int(round(s * scale))) for s in size)


def _check_scales(scales) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in ([scales] if isinstance(scales, (int, float)) else scales))
    except (TypeError, ValueError):
        values = ()
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"scales={scales!r}: expected a non-empty list of positive numbers, e.g. [0.75, 1.0, 1.25].")
    return values


def _infer_once(model, images, device, amp_dtype, channels_last, mode, window, stride, blend, batch_size, acc):
    if mode == "slide":
        return slide_logits(model, images, window, stride, device, amp_dtype, channels_last, batch_size, blend, acc)
    logits = whole_logits(model, images, device, amp_dtype, channels_last)
    return logits if acc is None else logits.to(acc)


@torch.inference_mode()
def tta_logits(model: nn.Module, images: torch.Tensor, device: str | torch.device = "cpu",
               amp_dtype: torch.dtype | None = None, channels_last: bool = False, *, flip: bool = True,
               scales: Sequence[float] = (1.0,), mode: str = "whole", window=512, stride=None, blend: str = "uniform",
               batch_size: int = 1, accumulate_device: str | torch.device | None = None) -> torch.Tensor:
    """The mean logits over ``scales`` x (identity, horizontal flip if ``flip``), each inferred whole or by sliding
    windows, un-flipped and resized back to the input size (module docstring). float32 ``(N, K, H, W)``."""
    images, scales = _as_batch(images), _check_scales(scales)
    size = tuple(images.shape[-2:])
    total, count = None, 0
    for scale in scales:
        scaled = images if scale == 1.0 else F.interpolate(images, size=_scaled_size(size, scale), mode="bilinear",
                                                           align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            logits = _infer_once(model, scaled.flip(-1) if flipped else scaled, device, amp_dtype, channels_last,
                                 mode, window, stride, blend, batch_size, accumulate_device)
            logits = _resized(logits.flip(-1) if flipped else logits, size)
            total = logits if total is None else total.add_(logits)
            count += 1
    return total.div_(count)


def slide_stride(window, stride=None, overlap: float = 0.5) -> tuple[int, int]:
    """``stride`` as ``(h, w)``, or ``window * (1 - overlap)`` rounded (at least 1 px) when it is None."""
    wh, ww = _pair(window, "window")
    if stride is not None:
        return _pair(stride, "stride")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise ValueError(f"overlap={overlap!r}: must be a number in [0, 1) (the share of a window its neighbour "
                         "covers too).")
    return max(1, int(round(wh * (1 - overlap)))), max(1, int(round(ww * (1 - overlap))))


@torch.inference_mode()
def infer_logits(model: nn.Module, images: torch.Tensor, device: str | torch.device = "cpu",
                 amp_dtype: torch.dtype | None = None, channels_last: bool = False, *, mode: str = "whole",
                 window=512, stride=None, overlap: float = 0.5, blend: str = "uniform", flip: bool = False,
                 scales: Sequence[float] = (1.0,), batch_size: int = 1,
                 accumulate_device: str | torch.device | None = None) -> torch.Tensor:
    """The one entry point of the command lines: float32 logits ``(N, K, H, W)`` at the input size of normalised
    ``images``, ``mode`` ``whole`` (one forward pass) or ``slide`` (``slide_logits``; ``stride`` None = ``window *
    (1 - overlap)``), with test-time augmentation when ``flip`` or ``scales`` != (1.0,) (``tta_logits``). The model
    must be in eval mode (``train_seg.checkpoint.load_checkpoint_model`` returns it so)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}.")
    stride = slide_stride(window, stride, overlap) if mode == "slide" else stride
    if mode == "slide":
        importance_map((1, 1), blend)  # checks the name before any forward pass
    scales = _check_scales(scales)
    if not flip and scales == (1.0,):
        return _infer_once(model, _as_batch(images), device, amp_dtype, channels_last, mode, window, stride, blend,
                           batch_size, accumulate_device)
    return tta_logits(model, images, device, amp_dtype, channels_last, flip=flip, scales=scales, mode=mode,
                      window=window, stride=stride, blend=blend, batch_size=batch_size,
                      accumulate_device=accumulate_device)


@dataclass(frozen=True)
class InferenceSettings:
    """How ``infer_logits`` infers (its keyword arguments but the device ones): checked on construction
    (``ValueError`` naming the field). ``from_mapping`` builds it from a config node or parsed arguments."""

    mode: str = "whole"
    window: Any = 512
    stride: Any = None
    overlap: float = 0.5
    blend: str = "uniform"
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not valid; choose one of {', '.join(MODES)}.")
        if self.blend not in BLENDS:
            raise ValueError(f"blend={self.blend!r} is not valid; choose one of {', '.join(BLENDS)}.")
        if not isinstance(self.flip, bool):
            raise ValueError(f"flip={self.flip!r}: use true or false.")
        object.__setattr__(self, "scales", _check_scales(self.scales))
        if self.mode == "slide":
            slide_stride(self.window, self.stride, self.overlap)

    @classmethod
    def from_mapping(cls, values: Mapping, prefix: str = "", names: Mapping[str, str] | None = None):
        """The settings from ``values[prefix + field]`` (absent fields: the defaults). A bad value raises
        ``ConfigError`` naming its key: ``names[field]`` if given, else ``prefix + field``."""
        from train_seg.config.validation import ConfigError

        fields = [f for f in cls.__dataclass_fields__ if prefix + f in values]
        try:
            return cls(**{f: values[prefix + f] for f in fields})
        except ValueError as exc:
            field_name = str(exc).split("=", 1)[0]
            key = (names or {}).get(field_name, prefix + field_name)
            raise ConfigError(f"{key}={str(exc).split('=', 1)[1]}") from None

    @property
    def tta(self) -> bool:
        """Whether test-time augmentation is on (a flip, or scales other than 1.0)."""
        return self.flip or self.scales != (1.0,)

    @property
    def plain(self) -> bool:
        """Whole image, no test-time augmentation: the plain forward pass."""
        return self.mode == "whole" and not self.tta

    def kwargs(self) -> dict:
        """The keyword arguments of ``infer_logits`` (and what metrics.json records of an evaluation)."""
        return {"mode": self.mode, "window": self.window, "stride": self.stride, "overlap": self.overlap,
                "blend": self.blend, "flip": self.flip, "scales": list(self.scales)}


# -- the notebook API ------------------------------------------------------------------------------------------
def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """``(K, H, W)`` probabilities from ``(K, H, W)`` logits: softmax, or ``[1 - p, p]`` of a one-channel head."""
    if logits.shape[0] == 1:
        p = torch.sigmoid(logits[0].float())
        return torch.stack([1 - p, p])
    return torch.softmax(logits.float(), dim=0)


def _tta_options(tta) -> TTA:
    if tta is None or tta is False:
        return TTA()
    if tta is True:
        return TTA(flip=True)
    if isinstance(tta, TTA):
        return tta
    if isinstance(tta, Mapping):
        return TTA(flip=bool(tta.get("flip", False)), scales=_check_scales(tta.get("scales", (1.0,))))
    raise ValueError(f"tta={tta!r}: use None, True (horizontal flip), TTA(flip=..., scales=...) or a mapping.")


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def predict(model: nn.Module, image: np.ndarray, meta: CheckpointMeta, *, mode: str = "whole", tta=None,
            window=512, stride=None, overlap: float = 0.5, blend: str = "uniform", batch_size: int = 1,
            device: str | torch.device | None = None, amp_dtype: torch.dtype | None = None,
            channels_last: bool = False, settings: InferenceSettings | None = None,
            accumulate_device: str | torch.device | None = None,
            probabilities: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicts one numpy image ``(H, W[, C])`` (uint8, uint16 or float in [0, 1]; grey, RGB or RGBA: conversions
    in the module docstring) with ``meta``'s normalisation. Returns ``(mask (H, W) int64, probabilities (K, H, W)
    float32, or None unless probabilities)`` at the image's size (K = number of classes, also for a binary head).
    ``tta``: None, True (horizontal flip), ``TTA(flip, scales)`` or ``{"flip": ..., "scales": [...]}``; ``settings``
    replaces mode, tta, window, stride, overlap and blend. Puts the model in eval mode; runs on the model's device
    unless ``device`` is given, in float32 unless ``amp_dtype`` is."""
    if settings is None:
        options = _tta_options(tta)
        settings = InferenceSettings(mode=mode, window=window, stride=stride, overlap=overlap, blend=blend,
                                     flip=options.flip, scales=options.scales)
    device = torch.device(device) if device is not None else _model_device(model)
    model.eval()
    logits = infer_logits(model, to_model_input(image, meta), device, amp_dtype, channels_last,
                          batch_size=batch_size, accumulate_device=accumulate_device, **settings.kwargs())
    mask = predictions(logits)[0].cpu().numpy().astype(np.int64)
    if not probabilities:
        return mask, None
    return mask, class_probabilities(logits[0]).cpu().numpy().astype(np.float32, copy=False)

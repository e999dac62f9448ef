"""The one argument layer of the commands that read and write named files (predict, export, stats, summary,
checkpoint convert): ``make_parser`` (one ``--help`` layout), ``Parser.error`` (one error path:
``<prog>: error: <one paragraph>`` on stderr, exit status 2, for argparse's own errors too), typed converters for
``type=`` that also check evaluate's Hydra values (``check``), and the option groups several commands share
(``add_checkpoint``, ``add_device``, ``add_inference``). Option names are evaluate's keys with ``.`` and ``_``
written as ``-`` (``inference.mode`` -> ``--inference-mode``).
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, NoReturn

from train_seg.config.command_line import exit_with_user_error

Converter = Callable[[object], object]
NULLS = ("null", "none", "~")


class BadValue(ValueError, argparse.ArgumentTypeError):
    """A value a converter refuses; the message says what is expected (argparse prefixes the option's name). No
    torch import here: the summary command never imports torch."""


# -- converters: raw text (command line) or an already typed value (a Hydra config) -> the value ---------------
def _refuse(value, expected: str) -> NoReturn:
    raise BadValue(f"{value!r}: {expected}")


def text(value) -> str:
    """Any non-empty text (file names with commas, ``=`` or spaces included)."""
    if not isinstance(value, str) or value == "":
        _refuse(value, "give a non-empty value")
    return value


def boolean(value) -> bool:
    """``true``/``false`` (also yes/no, on/off, 1/0) or a bool."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("true", "yes", "on", "1"):
        return True
    if word in ("false", "no", "off", "0"):
        return False
    _refuse(value, "use true or false")


def integer(low: int) -> Converter:
    """An integer ``>= low``."""
    def convert(value) -> int:
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                pass
        if number is None or number < low:
            _refuse(value, f"must be an integer >= {low}")
        return number

    return convert


def number(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Converter:
    """A number in ``[low, high]``; ``open_low``/``open_high`` leave that end out."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def convert(value) -> float:
        try:
            result = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            result = math.nan
        inside = (low < result if open_low else low <= result) and (result < high if open_high else result <= high)
        if isinstance(value, bool) or not inside:
            _refuse(value, f"must be a number in {interval}")
        return result

    return convert


def choice(*choices: str) -> Converter:
    """One of ``choices``."""
    def convert(value) -> str:
        if value not in choices:
            _refuse(value, f"is not valid; choose one of {', '.join(choices)}")
        return value

    return convert


def optional(convert: Converter) -> Converter:
    """``convert``, or None for ``null`` (and None)."""
    return lambda value: None if value is None or str(value).strip().lower() in NULLS else convert(value)


def _items(value) -> list:
    if not isinstance(value, str):
        return list(value) if isinstance(value, (list, tuple)) else [value]
    body = value.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    return [item.strip() for item in body.split(",")] if body.strip() else []


def pixels(value):
    """A side in pixels (``512``) or ``height,width`` (also ``[height,width]``): an int or a 2-list."""
    sides = [integer(1)(item) for item in _items(value)] if _items(value) else []
    if len(sides) not in (1, 2):
        _refuse(value, "expected a positive number of pixels or height,width")
    return sides[0] if len(sides) == 1 else sides


def scales(value) -> list[float]:
    """Comma-separated positive numbers (``0.75,1.0,1.25``, also ``[0.75,1.0]``) or a list of them."""
    try:
        values = [float(item) for item in _items(value) if not isinstance(item, bool)]
    except (TypeError, ValueError):
        values = []
    if not values or len(values) != len(_items(value)) or not all(math.isfinite(v) and v > 0 for v in values):
        _refuse(value, "expected a non-empty list of positive numbers, e.g. 0.75,1.0,1.25")
    return values


def check(key: str, value, convert: Converter):
    """A config value through a converter; ``ConfigError`` naming the key (``key=<value>: <what is expected>.``)."""
    from train_seg.config.validation import ConfigError

    try:
        return convert(value)
    except BadValue as exc:
        raise ConfigError(f"{key}={exc}.") from None


# -- the parser --------------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors take train_seg's one error path (``exit_with_user_error``)."""

    def __init__(self, name: str, **kwargs):
        kwargs.setdefault("prog", f"python -m {name}")
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.name = name

    def error(self, message: str) -> NoReturn:
        exit_with_user_error(self.name, ValueError(f"{message}; see {self.prog} --help."))


def make_parser(name: str, description: str, epilog: str = "Exit status: 0 done, 2 bad input (nothing written).") \
        -> Parser:
    """The parser of ``python -m <name>``: one description paragraph, the options, then ``epilog`` (exit statuses)."""
    return Parser(name, description=description, epilog=epilog)


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    """``--ckpt`` and ``--calibration`` (auto | none: the offsets of the run's calibration.json, or never)."""
    parser.add_argument("--ckpt", type=text, required=True, metavar="PATH",
                        help="checkpoint file (best.pt / last.pt) or run directory (its best.pt, else last.pt)")
    parser.add_argument("--calibration", type=choice("auto", "none"), default="auto",
                        help="auto: apply the logit offsets of the calibration.json beside the checkpoint when they "
                             "were fitted on it (train_seg.cli.calibrate) | none: the model as trained "
                             "(default: auto)")


def add_device(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--precision``, ``--channels-last``: null (absent) = the checkpoint's trainer settings."""
    group = parser.add_argument_group("device")
    group.add_argument("--device", type=text, default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    group.add_argument("--precision", type=optional(text), default=None,
                       help="auto | 32 | 16-mixed | bf16-mixed (default: the checkpoint's trainer.precision)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels-last memory format (default: the checkpoint's trainer.channels_last)")


ACCUMULATE = ("device", "cpu")


def add_inference(parser: argparse.ArgumentParser) -> None:
    """The inference keys of configs/evaluate.yaml; destinations are ``InferenceSettings`` field names."""
    from train_seg.evaluation.inference import BLENDS, MODES

    group = parser.add_argument_group("inference")
    group.add_argument("--inference-mode", dest="mode", type=choice(*MODES), default="whole",
                       help="whole: one forward pass per image | slide: windows (default: whole)")
    group.add_argument("--inference-window", dest="window", type=pixels, default=512, metavar="PX",
                       help="slide: window side in pixels, or height,width (default: 512)")
    group.add_argument("--inference-stride", dest="stride", type=optional(pixels), default=None, metavar="PX",
                       help="slide: step between windows (or height,width) (default: window * (1 - overlap))")
    group.add_argument("--inference-overlap", dest="overlap", type=number(0.0, 1.0, open_high=True), default=0.5,
                       help="slide: share of a window its neighbour covers, in [0, 1) (default: 0.5)")
    group.add_argument("--inference-blend", dest="blend", type=choice(*BLENDS), default="uniform",
                       help="slide: uniform | gaussian window weights (default: uniform)")
    group.add_argument("--inference-accumulate", dest="accumulate", type=choice(*ACCUMULATE), default="device",
                       help="device | cpu: where the logit sums live (default: device)")
    group.add_argument("--tta-flip", dest="flip", action=argparse.BooleanOptionalAction, default=False,
                       help="also infer the horizontally flipped image (logits averaged) (default: off)")
    group.add_argument("--tta-scales", dest="scales", type=scales, default=[1.0], metavar="S,S,...",
                       help="input scales, e.g. 0.75,1.0,1.25 (logits averaged) (default: 1.0)")
    group.add_argument("--batch-size", type=optional(integer(1)), default=None, metavar="N",
                       help="slide: windows per forward pass (default: the checkpoint's trainer.val_batch_size)")


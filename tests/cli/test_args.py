"""``train_seg.cli.args``: each converter's accepted and refused values (command-line text and Hydra values), the
one error path (exit status 2, ``<prog>: error: <one paragraph>``), and the shared ``--help`` layout of the five
file commands."""
from __future__ import annotations

import importlib

import pytest

from train_seg.cli import args
from train_seg.config.validation import ConfigError


@pytest.mark.parametrize("convert, given, expected", [
    (args.text, "a,b=c d.png", "a,b=c d.png"),
    (args.boolean, "true", True), (args.boolean, "off", False), (args.boolean, False, False),
    (args.integer(1), "3", 3), (args.integer(0), 0, 0),
    (args.number(0.0, 1.0), "0.25", 0.25), (args.number(0.0, 1.0), 1, 1.0),
    (args.number(0.0, 1.0, open_high=True), "0", 0.0),
    (args.choice("whole", "slide"), "slide", "slide"),
    (args.optional(args.integer(1)), "null", None), (args.optional(args.integer(1)), None, None),
    (args.pixels, "512", 512), (args.pixels, "32,48", [32, 48]), (args.pixels, "[32,48]", [32, 48]),
    (args.pixels, [32, 48], [32, 48]),
    (args.scales, "0.75,1.0,1.25", [0.75, 1.0, 1.25]), (args.scales, "[1.0]", [1.0]), (args.scales, [0.5, 1], [0.5, 1.0]),
])
def test_converters_accept(convert, given, expected):
    assert convert(given) == expected


@pytest.mark.parametrize("convert, given", [
    (args.text, ""), (args.boolean, "maybe"), (args.integer(1), "0"), (args.integer(1), "1.5"),
    (args.integer(0), True), (args.number(0.0, 1.0), "2"), (args.number(0.0, 1.0), "nan"),
    (args.number(0.0, 1.0, open_high=True), "1"), (args.number(0.0, 1.0, open_low=True), 0),
    (args.number(0.0, 1.0), True), (args.choice("whole", "slide"), "tiles"), (args.pixels, "0"),
    (args.pixels, "1,2,3"), (args.pixels, "x"), (args.scales, ""), (args.scales, "0,1"), (args.scales, "a"),
])
def test_converters_refuse(convert, given):
    with pytest.raises(args.BadValue, match=repr(given).replace("[", r"\[").replace("(", r"\(")):
        convert(given)


def test_check_names_the_key_of_a_config_value():
    assert args.check("num_workers", 2, args.integer(0)) == 2
    with pytest.raises(ConfigError, match=r"^batch_size=0: must be an integer >= 1\.$"):
        args.check("batch_size", 0, args.integer(1))


def test_bad_arguments_exit_2_with_one_paragraph(capsys):
    parser = args.make_parser("train_seg.cli.demo", "A demo.")
    parser.add_argument("--alpha", type=args.number(0.0, 1.0), default=0.5)
    errors = []
    for argv in (["--alpha", "2"], ["--nope"], ["extra"]):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("train_seg.cli.demo: error: ")
        assert len(err.strip().splitlines()) == 1 and "--help" in err, err
        errors.append(err)
    assert "--alpha: '2': must be a number in [0, 1]" in errors[0]


COMMANDS = ["predict", "export", "stats", "summary", "checkpoint"]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_file_command_has_the_same_help_layout(name, capsys):
    module = importlib.import_module(f"train_seg.cli.{name}")
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert out.startswith(f"usage: python -m train_seg.cli.{name} ")
    assert "Exit status: 0" in out and "options:" in out and "-h, --help" in out


@pytest.mark.parametrize("name", ["predict", "export"])
def test_the_checkpoint_commands_share_the_option_names(name):
    parser = importlib.import_module(f"train_seg.cli.{name}").parser()
    options = {opt for action in parser._actions for opt in action.option_strings}
    assert {"--ckpt", "--output", "--overwrite"} <= options
    if name == "predict":
        assert {"--device", "--precision", "--inference-mode", "--inference-window", "--inference-overlap",
                "--inference-blend", "--tta-flip", "--tta-scales", "--batch-size"} <= options

"""The wtours command line: every subcommand has --help with an example; usage errors exit 2."""

import subprocess
import sys

import pytest

from wtours.cli import build_parser, main

LEAVES = [
    ["download"], ["index"], ["prepare"], ["synth"], ["pretrain"], ["eval", "clustering"], ["eval", "propagation"],
    ["eval", "incontext"], ["eval", "linear"],
    ["bench", "decode"], ["bench", "train"], ["bench", "eval"], ["bench", "learn"], ["bench", "instruments"],
    ["report"],
]


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("download", "index", "prepare", "synth", "pretrain", "eval", "bench", "report"):
        assert f"    {name}" in out


@pytest.mark.parametrize("cmd", LEAVES, ids=lambda c: " ".join(c))
def test_each_subcommand_help_has_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"wtours {cmd[0]}" in out.split("example:")[1]


@pytest.mark.parametrize("cmd", [[], ["eval"], ["bench"]])
def test_missing_subcommand_exits_2(cmd, capsys):
    assert main(cmd) == 2
    assert "usage:" in capsys.readouterr().err


def test_every_leaf_handler_is_importable_and_has_cli_main():
    import importlib

    parser = build_parser()
    required = {
        "download": ["x"], "index": ["x"], "prepare": ["x"], "synth": ["--out", "x"], "pretrain": [],
        "eval": ["clustering", "--dataset", "synth", "--root", "x", "--checkpoint", "y"],
        "bench": [], "report": ["x"],
    }
    for cmd in LEAVES:
        extra = required[cmd[0]] if len(cmd) == 1 or cmd[0] != "eval" else required["eval"][1:]
        args = parser.parse_args([*cmd, *extra])
        module = importlib.import_module(args._handler)
        assert callable(getattr(module, "cli_main", None)), args._handler


def test_unknown_option_is_a_usage_error_without_traceback():
    r = subprocess.run([sys.executable, "-m", "wtours.cli", "index", "a.mp4", "--no-such-flag"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_os_error_on_an_output_path_is_one_line_exit_2(bigbuckbunny, capsys):
    assert main(["prepare", str(bigbuckbunny), "--short-side", "48", "--out", "/proc/no/such/dir/x.mp4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wtours prepare: error: /proc/no/such/dir") and "\n" not in err


def test_every_option_of_every_command_has_help_text():
    """``wtours <cmd> --help`` explains every option and positional (issue 19)."""
    import argparse

    from wtours.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, [*path, name])
            elif not a.help:
                missing.append(" ".join([*path, *(a.option_strings[-1:] or [a.dest])]))

    walk(build_parser(), ["wtours"])
    assert missing == []

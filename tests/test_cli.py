"""The helpers every command line shares: one-line errors, checks made before loading anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from remedi import evaluate
from remedi.cli import (
    ArgumentParser,
    UsageError,
    check_device,
    check_model_spec,
    check_output_dir,
    one_line,
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lim", "2"], "unrecognized arguments: --lim 2"),  # no abbreviation of --limit
        (["--method", "rom"], "argument --method: invalid choice: 'rom'"),
    ],
)
def test_argparse_mistakes_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    base = ["--method", "none", "--data", "builtin", "--output", "out"]
    with pytest.raises(SystemExit) as stop:
        evaluate.main([*base, *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert err.rstrip().endswith("(see python -m remedi.evaluate --help)")


def test_help_shows_defaults_but_not_for_required_flags_or_switches() -> None:
    parser = ArgumentParser(prog="p")
    parser.add_argument("--size", type=int, default=3, help="a size")
    parser.add_argument("--data", required=True, help="the data")
    parser.add_argument("--quiet", action="store_true", help="say less")
    text = parser.format_help()
    assert "a size (default: 3)" in text
    assert "the data\n" in text and "say less\n" in text


def test_device_and_output_checks(tmp_path: Path) -> None:
    check_device("cpu")
    with pytest.raises(UsageError, match="--device 'cuda:7'"):
        check_device("cuda:7")
    with pytest.raises(UsageError, match="is not a device"):
        check_device("gpu0")
    check_output_dir(tmp_path / "new" / "folder")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(UsageError, match="is not writable"):
        check_output_dir(tmp_path / "file" / "below")


def test_model_spec_and_messages() -> None:
    check_model_spec("gemma3-270m")
    check_model_spec("EleutherAI/gpt-j-6b")
    with pytest.raises(UsageError, match="--model 'nonsense' is neither"):
        check_model_spec("nonsense")
    assert one_line(ValueError("\n  first line\nsecond")) == "first line"
    assert one_line(ValueError()) == "ValueError"

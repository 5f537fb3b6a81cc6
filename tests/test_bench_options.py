"""Every bench option value is checked before the work starts (issue 20 #6): one line, exit 2, nothing run."""

from __future__ import annotations

import pytest

from wtours.cli import main


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_bench_neco_batch_0_is_refused_not_replaced_by_the_default(capsys):
    assert main(["bench", "neco", "--batch", "0"]) == 2
    _one_line(capsys, "wtours bench: error: --batch must be >= 1, got 0")


@pytest.mark.parametrize("argv", [
    ["bench", "learn", "--max-steps", "1", "--seeds", "0"],
    ["bench", "neco", "--steps", "1"],
    ["bench", "train", "--steps", "1"],
    ["bench", "eval", "--sequences", "1", "--frames", "1"],
    ["bench", "decode", "--clips", "1"],
])
def test_bench_json_that_is_a_directory_is_refused_before_the_work(argv, tmp_path, capsys, monkeypatch):
    """`bench learn --json DIR` ran the whole bench, then named a temp file."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "a-dir"
    target.mkdir()
    assert main([*argv, "--json", str(target), *(["--out", str(tmp_path / "out")] if "learn" in argv else [])]) == 2
    _one_line(capsys, f"wtours bench: error: {target}: --json: is a directory; give a file name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir"]  # nothing was run or written


def test_bench_json_under_a_file_is_refused_before_the_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["bench", "neco", "--steps", "1", "--json", str(tmp_path / "file" / "out.json")]) == 2
    _one_line(capsys, f"--json: {tmp_path / 'file'} is not a folder")


@pytest.mark.parametrize("argv, needle", [
    (["bench", "decode", "--short-side", "0"], "--short-side must be >= 2, got 0"),
    (["bench", "decode", "--stride", "0"], "--stride must be >= 1, got 0"),
    (["bench", "decode", "--gflop-per-frame", "-1"], "--gflop-per-frame must be > 0, got -1"),
    (["bench", "eval", "--k", "0"], "--k 0: K must be >= 1"),
])
def test_bench_sizes_out_of_range_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    _one_line(capsys, needle)


def test_a_write_onto_a_directory_names_the_directory_not_a_temp_file(tmp_path):
    from wtours.errors import UserError
    from wtours.fsutil import write_json

    with pytest.raises(UserError) as e:
        write_json(tmp_path, {"a": 1})
    assert str(e.value) == f"{tmp_path}: is a directory; give a file name"
    assert list(tmp_path.iterdir()) == []

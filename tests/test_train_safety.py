"""wtours pretrain / eval / report on damaged, hostile or diverging input: one line, exit 2, nothing lost.

One finished micro run (module fixture) is copied by the tests that need a run directory.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

from test_integrity import _FailingFile, flip_tensor_bytes
from test_train_pretrain import MICRO, _killer, _Kill
from wtours.cli import main

pytestmark = pytest.mark.slow

SETS = sum((["--set", s] for s in MICRO), [])
EVAL = ["--config", "eval/tiny", "--device", "cpu", "--set", "progress=false"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic tour that is also a 1-sequence eval dataset root."""
    from wtours.video.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    res = synthesize(out_dir=out, width=160, height=90, fps=10.0, seconds=3.0, sequences=1, seq_frames=4,
                     progress=False)
    return str(res.video), out


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synth):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["pretrain", "--config", "video/default", "--video", synth[0], "--out", str(out), *SETS]) == 0
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    err = [e for e in err if "holds a run: continuing it" not in e]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_a_damaged_last_ckpt_is_refused_and_the_backbone_kept(finished, synth, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    ckpt, bb = run / "stage1" / "last.ckpt", run / "stage1" / "backbone.pt"
    flip_tensor_bytes(ckpt)
    before = bb.read_bytes()
    capsys.readouterr()
    for extra in ([], ["--resume"]):  # auto-resume and explicit --resume
        assert main(["pretrain", "--config", "video/default", "--video", synth[0], "--out", str(run), *SETS, *extra]) == 2
        _one_line(capsys, f"{ckpt}: checksum mismatch: the file is damaged", "--fresh")
        assert bb.read_bytes() == before


def test_a_damaged_backbone_is_refused_by_eval_and_flagged_by_report(finished, synth, tmp_path, capsys):
    bb = tmp_path / "backbone.pt"
    shutil.copy(finished / "stage1" / "backbone.pt", bb)
    meta = torch.load(bb, weights_only=True)["meta"]
    assert meta["wtours_checksum"].startswith("sha256:") and meta["steps"] == 4
    flip_tensor_bytes(bb)
    rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth[1]), "--checkpoint", str(bb),
               "--out", str(tmp_path / "ev"), *EVAL])
    assert rc == 2
    _one_line(capsys, f"{bb}: checksum mismatch: the file is damaged")
    run = _copy(finished, tmp_path / "r")
    flip_tensor_bytes(run / "stage1" / "backbone.pt")
    assert main(["report", str(run)]) == 0
    assert "**checksum mismatch: the file is damaged" in (run / "report.md").read_text()


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["report", str(tmp_path)]) == 2
    _one_line(capsys, f"{tmp_path}: not a run directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_stale_temp_files_of_killed_writes_are_removed_at_start(finished, synth, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    stage = run / "stage1"
    stale = [stage / ".last.ckpt.a1b2c3d4.tmp", stage / ".backbone.pt.zz_9y8x7.tmp"]
    keep = [stage / "notes.tmp", stage / ".last.ckpt.tmp", run / ".config.yaml.abcdefgh.tmp"]
    for p in stale + keep:
        p.write_bytes(b"x" * 1000)
    assert main(["pretrain", "--config", "video/default", "--video", synth[0], "--out", str(run), *SETS]) == 0
    assert "removed 2 temp file(s)" in capsys.readouterr().err
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"x" * 1000 for p in keep)


def test_a_killed_fresh_start_never_lets_a_rerun_continue_the_old_run(finished, synth, tmp_path, monkeypatch, capsys):
    import functools

    import wtours.stages.video.run as pretrain

    run = _copy(finished, tmp_path)
    old_bb = (run / "stage1" / "backbone.pt").read_bytes()
    real = pretrain.run_pretrain
    args = ["pretrain", "--config", "video/default", "--video", synth[0], "--out", str(run), *SETS]
    monkeypatch.setattr(pretrain, "run_pretrain", functools.partial(real, extra_callbacks=[_killer(1)]))
    with pytest.raises(_Kill):  # --fresh, killed before its first checkpoint
        main([*args, "--fresh"])
    assert not (run / "stage1" / "last.ckpt").exists()
    (aside,) = run.glob("stage1.old-*")
    assert (aside / "backbone.pt").read_bytes() == old_bb  # nothing lost yet
    capsys.readouterr()
    # the plain re-run starts a new run: it does not continue (or re-export) the old one ...
    monkeypatch.setattr(pretrain, "run_pretrain", functools.partial(real, extra_callbacks=[_killer(2)]))
    with pytest.raises(_Kill):
        main(args)
    assert "continuing" not in capsys.readouterr().err
    ck = torch.load(run / "stage1" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 2 and not (run / "stage1" / "backbone.pt").exists()
    # ... and its first checkpoint dropped the old run
    assert not list(run.glob("stage1.old-*"))


def test_a_diverging_run_stops_keeps_the_last_good_checkpoint_and_exports_nothing(synth, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["pretrain", "--config", "video/default", "--video", synth[0], "--out", str(out), *SETS,
               "--set", "optim.lr=100000.0", "--set", "optim.clip_grad=0", "--set", "trainer.checkpoint_every=1"])
    assert rc == 2
    line = _one_line(capsys, "training diverged", "nothing exported", "lower optim.lr (now 100000)",
                     "optim.clip_grad, now 0")
    # caught at the first save: by the probe batch's features (issue 20) before the weights went non-finite
    assert "probe features of student.vit: features reach " in line or "non-finite weights in student." in line
    assert not (out / "stage1" / "backbone.pt").exists()
    ck = torch.load(out / "stage1" / "last.ckpt", weights_only=True)
    assert f"kept the last good checkpoint {out / 'stage1' / 'last.ckpt'} (step {ck['global_step']})" in line
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("exc, rc, needle", [
    (KeyboardInterrupt(), 130, "wtours pretrain: interrupted"),
    (OSError(errno.ENOSPC, "No space left on device"), 2, "last.ckpt: No space left on device"),
])
def test_a_checkpoint_write_that_fails_keeps_the_old_file(finished, synth, tmp_path, monkeypatch, capsys,
                                                          exc, rc, needle):
    import wtours.fsutil as fsutil

    run = _copy(finished, tmp_path)
    ckpt = run / "stage1" / "last.ckpt"
    before = ckpt.read_bytes()

    def fdopen(fd, *a, **k):  # every file written fails past 1 MiB: the first such write is last.ckpt
        return _FailingFile(os.fdopen(fd, *a, **k), exc, ok=1 << 20)

    monkeypatch.setattr(fsutil, "_fdopen", fdopen, raising=False)
    capsys.readouterr()
    assert main(["pretrain", "--config", "video/default", "--video", synth[0], "--out", str(run), *SETS]) == rc
    err = capsys.readouterr().err
    assert needle in err.strip().splitlines()[-1] and "Traceback" not in err and "enforce fail" not in err
    assert ckpt.read_bytes() == before
    assert not list((run / "stage1").glob(".*.tmp"))


def test_hostile_and_impossible_requests_are_one_line_errors(finished, synth, tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    marker = tmp_path / "MARKER"
    from test_integrity import _RunsCode

    ck = torch.load(finished / "stage1" / "last.ckpt", weights_only=True)
    ck["x"] = _RunsCode(marker)
    torch.save(ck, evil)
    base = ["pretrain", "--config", "video/default", "--video", synth[0], "--out", str(tmp_path / "a"), *SETS]
    assert main([*base, "--resume", str(evil)]) == 2
    _one_line(capsys, f"{evil}: contains pickled Python objects that could run code", "--trust-checkpoint")
    assert main(["eval", "clustering", "--dataset", "synth", "--root", str(synth[1]), "--checkpoint", str(evil),
                 "--out", str(tmp_path / "ev"), *EVAL]) == 2
    _one_line(capsys, f"{evil}: contains pickled Python objects", "--trust-checkpoint")
    assert not marker.exists()
    assert main(["eval", "clustering", "--dataset", "synth", "--root", str(synth[1]), "--checkpoint",
                 "random:resnet18", "--out", str(tmp_path / "ev"), *EVAL]) == 2
    _one_line(capsys, "'resnet18' is a ResNet, not a ViT")
    assert main([*base, "--num-nodes", "0"]) == 2
    _one_line(capsys, "--num-nodes: must be >= 1, got 0")
    assert main([*base, "--devices", "0,5", "--set", "trainer.accelerator=cpu"]) == 2
    _one_line(capsys, "cannot set up training (accelerator='cpu', devices=[0, 5]", "should be an int > 0")
    if not torch.cuda.is_available():
        assert main([*base, "--set", "trainer.accelerator=gpu"]) == 2
        _one_line(capsys, "trainer.accelerator: 'gpu' needs a CUDA GPU")
    for override, needle in (("optim.lr=.nan", "optim.lr: must be a finite number"),
                             ("data.prefetch_factor=0", "data.prefetch_factor: must be >= 1"),
                             ("model.arch=resnet18", "model.arch: 'resnet18' is a ResNet, not a ViT")):
        assert main([*base, "--set", override]) == 2
        _one_line(capsys, needle)
    assert not (tmp_path / "a" / "stage1" / "last.ckpt").exists()


def test_an_explosion_between_two_checks_is_stopped_before_the_export(synth, tmp_path, capsys):
    """Issue 20 #1: `pretrain --max-steps 2 --set optim.lr=1e30` exported a backbone with weights of 5e27;
    no periodic check falls inside these 2 steps, so the check before the final save must catch it."""
    out = tmp_path / "run"
    rc = main(["pretrain", "--config", "video/default", "--video", synth[0], "--out", str(out), *SETS,
               "--max-steps", "2", "--set", "trainer.log_every=50", "--set", "trainer.checkpoint_every=50",
               "--set", "optim.lr=1e30"])
    assert rc == 2
    line = _one_line(capsys, "training diverged (checked at step 2): weights up to ", "past the bound 1e+06",
                     "no checkpoint was saved, nothing exported", "lower optim.lr (now 1e+30)")
    assert line.startswith("wtours pretrain: error: ")
    assert not (out / "stage1" / "backbone.pt").exists() and not (out / "stage1" / "last.ckpt").exists()


@pytest.mark.parametrize("bad", ["video", "init", "frames"])
def test_fresh_checks_every_input_before_it_sets_the_old_run_aside(finished, synth, tmp_path, capsys, bad):
    """Issue 20 #4: `--fresh --video text.mp4` on a finished run exited 2 with an empty stage1/ (the good
    backbone only in stage1.old-*)."""
    run = _copy(finished, tmp_path)
    old = {p.name: p.read_bytes() for p in (run / "stage1").iterdir() if p.is_file()}
    text = tmp_path / "text.mp4"
    text.write_text("not a video\n")
    data = ["--video", synth[0]]
    extra = []
    if bad == "video":
        data = ["--video", str(text)]
    elif bad == "init":
        extra = ["--init", str(text)]
    else:
        data = ["--frames", str(tmp_path / "no-such-folder")]
    rc = main(["pretrain", "--config", "video/default", *data, *extra, "--out", str(run), *SETS, "--fresh"])
    assert rc == 2
    _one_line(capsys, "wtours pretrain: error: ", str(text) if bad != "frames" else "no-such-folder")
    assert not list(run.glob("stage1.old-*"))
    assert {p.name: p.read_bytes() for p in (run / "stage1").iterdir() if p.is_file()} == old

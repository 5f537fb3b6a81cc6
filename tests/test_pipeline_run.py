"""The tiny pipeline end to end on CPU (micro sizes): run directory, status files, tables, report; a re-run skips
everything; a changed stage-2 key re-runs stage 2 and the stages after it only; a kill during stage 2 resumes
it exactly without re-training stage 1; the video stage under torchrun (2 gloo ranks)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from wtours.cli import main
from wtours.integrity import content_digest

pytestmark = pytest.mark.slow

MICRO = {
    "video": ["trainer.max_steps=2", "trainer.checkpoint_every=2", "log.picture_every=2", "log.tensorboard=false",
              "data.num_workers=0", "data.synth.width=160", "data.synth.height=90", "data.synth.seconds=4",
              "data.synth.sequences=2", "data.synth.seq_frames=4"],
    "neco": ["trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.log_every=1", "data.frames=24",
             "data.batch_size=4", "log.picture_every=2", "log.tensorboard=false"],
    "eval_video": ["repeats=1", "niter=5"],
    "eval_neco": ["repeats=1", "niter=5"],
}
SETS = [x for stage, items in MICRO.items() for item in items for x in ("--set", f"{stage}.{item}")]
STAGES = ("video", "eval_video", "neco", "eval_neco")


def _status(run, stage):
    return json.loads((run / stage / "status.json").read_text())


def _bytes(run, *stages):
    return {s: (run / s / "status.json").read_bytes() for s in stages}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("pipe") / "run"
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = main(["pretrain", "--pipeline", "tiny", "--out", str(out), *SETS])
    assert rc == 0, se.getvalue()[-3000:]
    return out, so.getvalue(), se.getvalue()


def test_tiny_pipeline_end_to_end(tiny_run, capsys):
    out, stdout, stderr = tiny_run
    for s in STAGES:
        st = _status(out, s)
        assert st["state"] == "done" and st["fingerprint"].startswith("sha256:") and st["seconds"] > 0
    for s, sub in (("video", "stage1"), ("neco", "stage2")):
        st = _status(out, s)
        assert st["backbone"] == f"{s}/{sub}/backbone.pt" and st["arch"] == "vit_nano_patch8_64"
        bb = torch.load(out / st["backbone"], map_location="cpu", weights_only=True)
        assert st["backbone_checksum"] == content_digest({"arch": bb["arch"], "state_dict": bb["state_dict"]})
    assert _status(out, "neco")["input"]["backbone_checksum"] == _status(out, "video")["backbone_checksum"]
    assert (out / "pipeline.yaml").is_file() and (out / "data" / "synth" / "davis").is_dir()
    for s, inp in (("eval_video", "video"), ("eval_neco", "neco")):
        doc = json.loads((out / s / "metrics.json").read_text())
        names = ["F", "C", "D", "K=20", "J&F", "in-context", "linear"]  # clustering, then the dense instruments
        assert doc["input"] == inp and doc["metric_names"] == names
        enc = doc["datasets"]["synth"]["encoders"]
        assert enc["random"]["spec"] == "random:vit_nano_patch8_64@0"
        for e in enc.values():
            assert set(e["scores"]) == set(names) and all(0 <= v <= 100 for v in e["scores"].values())
        dense = json.loads((out / s / "synth" / "trained" / "dense" / "scores.json").read_text())["scores"]
        assert dense == {k: enc["trained"]["scores"][k] for k in ("J&F", "in-context", "linear")}
    # the per-stage tables and the summary, printed
    assert "eval_video: video vs random init, mIoU %" in stdout and "eval_neco: neco vs random init" in stdout
    summary = stdout.split("tiny: scores % per stage")[1]
    assert "J&F propagation, in-context and linear-probe mIoU" in summary.splitlines()[0]
    assert "random init (vit_nano_patch8_64)" in summary and "after video" in summary and "after neco" in summary
    assert "[1/4] video: done in" in stderr and "[4/4] eval_neco: done in" in stderr
    # the report
    md = (out / "report.md").read_text()
    for part in ("## Pipeline", "| video | video | video/dora_timet_tiny", "## Results (measured here)",
                 "Published numbers (not measured here)", "| davis | TimeT | 53.7 | 53.0 | 20.5 |", "| NeCo | 17.8",
                 "](video/loss.png)", "](video/stage1/pictures/masks_step000002.png)", "](neco/loss.png)",
                 "](video/stage1/collapse.png)", "](neco/stage2/collapse.png)",
                 "frame | ground truth | random init | after video | after neco](overlays_synth.png)"):
        assert part in md, part
    page = (out / "report.html").read_text()
    n_img = md.count("![")
    assert page.count('src="data:image/png;base64,') == n_img >= 8 and page.count("src=") == n_img
    for caption in ("collapse signals", "frame | ground truth | random init | after video | after neco",
                    "tracked-object masks"):  # the HTML embeds every picture the markdown shows
        assert f'alt="{caption}' in page or caption in page, caption

    # the same command again: every stage is skipped, nothing is rewritten
    before = _bytes(out, *STAGES)
    backbone_mtime = (out / "video" / "stage1" / "backbone.pt").stat().st_mtime_ns
    assert main(["pretrain", "--pipeline", "tiny", "--out", str(out), *SETS]) == 0
    err = capsys.readouterr().err
    assert all(f"{s}: done earlier" in err for s in STAGES), err
    assert _bytes(out, *STAGES) == before
    assert (out / "video" / "stage1" / "backbone.pt").stat().st_mtime_ns == backbone_mtime


def test_a_changed_stage2_key_reruns_stage2_and_the_stages_after_it_only(tiny_run, tmp_path, capsys):
    src, _, _ = tiny_run
    run = tmp_path / "moved"
    shutil.copytree(src, run)  # a copied run directory keeps its finished stages
    before = _bytes(run, *STAGES)
    assert main(["pretrain", "--pipeline", "tiny", "--out", str(run), *SETS, "--set", "neco.optim.lr_head=0.002"]) == 0
    err = capsys.readouterr().err
    changed = [ln for ln in err.splitlines() if "config changed" in ln]
    assert changed == ["pipeline: stage 'neco': config changed since the last run (optim.lr_head): re-running it and "
                       "every stage after it (eval_neco)"]
    assert "video: done earlier" in err and "eval_video: done earlier" in err
    after = _bytes(run, *STAGES)
    assert after["video"] == before["video"] and after["eval_video"] == before["eval_video"]
    old, new = json.loads(before["neco"]), _status(run, "neco")
    assert new["state"] == "done" and new["backbone_checksum"] != old["backbone_checksum"]
    assert new["config"]["optim.lr_head"] == 0.002
    assert _status(run, "eval_neco")["input"]["backbone_checksum"] == new["backbone_checksum"]


class _Kill(RuntimeError):
    pass


def _killer(at_step):
    from lightning.pytorch.callbacks import Callback

    class Killer(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == at_step:
                raise _Kill(f"killed at step {trainer.global_step}")

    return Killer()


def test_kill_during_stage2_then_rerun_continues_it_exactly_without_retraining_stage1(tiny_run, tmp_path, capsys):
    from wtours.pipeline.run import run_pipeline
    from wtours.pipeline.spec import load_pipeline, select_stages

    src, _, _ = tiny_run
    run = tmp_path / "killed"
    shutil.copytree(src, run)
    for s in ("neco", "eval_neco"):  # as if stage 2 had never run
        shutil.rmtree(run / s)
    video_status = (run / "video" / "status.json").read_bytes()
    bb_mtime = (run / "video" / "stage1" / "backbone.pt").stat().st_mtime_ns
    sets = [x for x in SETS if x != "--set"]
    pipe = load_pipeline("tiny", sets)
    with pytest.raises(_Kill):
        run_pipeline(pipe, run, stages=select_stages(pipe, "video,neco"), callbacks={"neco": [_killer(3)]},
                     progress=False)
    st = _status(run, "neco")
    assert st["state"] == "running" and (run / "neco" / "stage2" / "last.ckpt").is_file()
    assert not (run / "neco" / "stage2" / "backbone.pt").exists()
    capsys.readouterr()
    assert main(["pretrain", "--pipeline", "tiny", "--out", str(run), *SETS]) == 0
    err = capsys.readouterr().err
    assert "video: done earlier" in err and "neco: neco stage" in err and "continuing its last checkpoint" in err
    assert (run / "video" / "status.json").read_bytes() == video_status
    assert (run / "video" / "stage1" / "backbone.pt").stat().st_mtime_ns == bb_mtime
    st = _status(run, "neco")
    assert st["state"] == "done" and st["runs"] == 2 and st["steps"] == 4
    resumed = torch.load(run / "neco" / "stage2" / "backbone.pt", map_location="cpu", weights_only=True)["state_dict"]
    whole = torch.load(src / "neco" / "stage2" / "backbone.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert resumed.keys() == whole.keys()
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
    assert _status(run, "neco")["backbone_checksum"] == _status(src, "neco")["backbone_checksum"]


def test_torchrun_two_gloo_ranks_run_the_video_stage(tmp_path):
    out = tmp_path / "ddp"
    video_sets = [x for item in MICRO["video"] for x in ("--set", f"video.{item}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "wtours.cli",
           "pretrain", "--pipeline", "tiny", "--stages", "video", "--out", str(out), "--devices", "2",
           *video_sets, "--set", "video.trainer.accelerator=cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "running 2 CPU processes (DDP, gloo)" in r.stderr
    st = _status(out, "video")
    assert st["state"] == "done" and st["steps"] == 2
    meta = torch.load(out / "video" / "stage1" / "backbone.pt", map_location="cpu", weights_only=True)["meta"]
    assert meta["clips_seen"] == 2 * 2 * 4  # steps x ranks x batch
    assert _status(out, "neco")["state"] == "pending"


def test_the_tiny_pipeline_run_twice_gives_identical_backbones(tmp_path, monkeypatch, capsys):
    """Issue 20 #3: two uninterrupted runs of one pipeline with one seed differed (video stage up to 6e-8, NeCo
    up to 5.8e-5) because the proxy transcode was not reproducible. The tiny pipeline's training stages
    (shortened to 4 steps each; evaluations left out), each run with its own proxy cache and synthetic tour."""
    sds = []
    for i in (1, 2):
        monkeypatch.setenv("WTOURS_CACHE", str(tmp_path / f"cache{i}"))
        out = tmp_path / f"run{i}"
        assert main(["pretrain", "--pipeline", "tiny", "--out", str(out), "--stages", "video,neco",
                     "--set", "video.trainer.max_steps=4", "--set", "neco.trainer.max_steps=4"]) == 0
        assert len(list((tmp_path / f"cache{i}" / "proxy").glob("*.mp4"))) == 1  # the video stage used a proxy
        sds.append({s: torch.load(out / s / f"stage{n}" / "backbone.pt", weights_only=True)["state_dict"]
                    for s, n in (("video", 1), ("neco", 2))})
    for stage in ("video", "neco"):
        a, b = sds[0][stage], sds[1][stage]
        assert a.keys() == b.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], stage


@pytest.mark.parametrize("bad", ["images", "davis"])
def test_later_stages_data_is_checked_before_stage1_trains(tmp_path, capsys, bad):
    """Issue 20 #7: an empty --images and a --davis without Annotations were found only after stage 1 trained."""
    from wtours.video.synth import synthesize

    src = synthesize(tmp_path / "src", width=160, height=90, fps=10.0, seconds=3.0, sequences=1, seq_frames=3,
                     progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    davis = tmp_path / "DAVIS"
    (davis / "JPEGImages" / "480p").mkdir(parents=True)
    extra = ["--images", str(empty)] if bad == "images" else ["--davis", str(davis)]
    out = tmp_path / "run"
    rc = main(["pretrain", "--pipeline", "tiny", "--out", str(out), "--video", str(src.video), *SETS, *extra])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()  # the synthetic ground truth's progress, then the error
    assert err[-1].startswith("wtours pretrain: error: ") and "Traceback" not in "".join(err), err
    assert (f"{empty}: --images: " if bad == "images" else str(davis)) in err[-1], err[-1]
    assert not (out / "video" / "stage1").exists()
    if bad == "images":  # a --video was given: the synthetic tour is written for its ground truth only
        assert not any("no --video given" in ln for ln in err)
        assert err[0].startswith("no --davis / --ytvos given: its DAVIS-layout ground truth is the evaluation set: "
                                 "writing a synthetic walking tour to ")


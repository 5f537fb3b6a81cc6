"""Pipeline files: the shipped ones load; a bad file (unknown kind, missing input, cycle, ...) is one line, exit 2;
--set / --stages in pipeline mode; the pretrain mode rule (pipeline unless a stage-1-only option is given)."""

from __future__ import annotations

import argparse

import pytest

from wtours.cli import main
from wtours.errors import UserError
from wtours.commands.pretrain import pipeline_mode
from wtours.pipeline.spec import PIPELINE_DIR, load_pipeline, select_stages

GOOD = """
stages:
  video: {kind: video, config: video/tiny}
  eval_video: {kind: eval, config: eval/tiny, input: video}
  neco: {kind: neco, config: neco/tiny, input: video, set: {trainer: {max_steps: 3}}}
"""


def _write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["walking-tours", "dora-only", "timet-finetune", "tiny"])
def test_shipped_pipelines_load_with_their_configs(name):
    pipe = load_pipeline(name)
    assert pipe.name == name and pipe.stages[0].kind == "video" and pipe.stages[0].input is None
    assert any(s.kind == "eval" for s in pipe.stages)
    assert (PIPELINE_DIR / f"{name}.yaml").is_file()


def test_default_and_tiny_chains():
    assert [(s.name, s.kind, s.input) for s in load_pipeline("walking-tours").stages] == [
        ("video", "video", None), ("eval_video", "eval", "video"), ("neco", "neco", "video"),
        ("eval_neco", "eval", "neco")]
    assert [s.kind for s in load_pipeline("tiny").stages] == ["video", "eval", "neco", "eval"]


def test_overrides_from_the_file_then_the_command_line(tmp_path):
    pipe = load_pipeline(_write(tmp_path, GOOD), ["neco.optim.lr_head=0.01", "video.seed=3"])
    assert pipe.stage("neco").overrides == ["trainer.max_steps=3", "optim.lr_head=0.01"]
    assert pipe.stage("video").overrides == ["seed=3"]
    assert pipe.downstream("video") == ["eval_video", "neco"]
    assert [s.name for s in select_stages(pipe, "neco,video")] == ["video", "neco"]


def test_stages_run_after_their_input_whatever_the_file_order(tmp_path):
    pipe = load_pipeline(_write(tmp_path, """
stages:
  ev: {kind: eval, config: eval/tiny, input: n}
  n: {kind: neco, config: neco/tiny, input: v}
  v: {kind: video, config: video/tiny}
"""))
    assert pipe.names == ["v", "n", "ev"]


@pytest.mark.parametrize("text, words", [
    ("stages:\n  v: {kind: video, config: video/tiny}\n  x: {kind: vidoe, config: video/tiny, input: v}\n",
     ["stage 'x'", "unknown kind 'vidoe'", "valid kinds: video, neco, eval"]),
    ("stages:\n  v: {kind: video, config: video/tiny}\n  e: {kind: eval, config: eval/tiny, input: nope}\n",
     ["stage 'e'", "input 'nope' is not a stage"]),
    ("stages:\n  v: {kind: video, config: video/tiny}\n  e: {kind: eval, config: eval/tiny}\n",
     ["stage 'e'", "needs an 'input'"]),
    ("stages:\n  a: {kind: video, config: video/tiny, input: b}\n  b: {kind: neco, config: neco/tiny, input: a}\n",
     ["cycle", "a -> b -> a"]),
    ("stages:\n  a: {kind: video, config: video/tiny, input: a}\n", ["cycle", "a -> a"]),
    ("stages:\n  v: {kind: video, config: video/tiny}\n  e: {kind: eval, config: eval/tiny, input: v}\n"
     "  f: {kind: eval, config: eval/tiny, input: e}\n", ["stage 'f'", "'e' is an eval stage"]),
    ("stages:\n  v: {kind: video, config: video/nope}\n", ["stage 'v'", "config file not found"]),
    ("stages:\n  v: {kind: video, config: video/tiny, set: {optim.lrr: 1}}\n", ["stage 'v'", "optim.lrr"]),
    ("stages:\n  v: {kind: video, config: video/tiny, inptu: x}\n", ["unknown key 'inptu'"]),
    ("stages: [1, 2]\n", ["'stages' must be a non-empty mapping"]),
    ("stages:\n  v: {kind: video\n", ["invalid YAML"]),
])
def test_bad_pipeline_file_is_one_line_exit_2(tmp_path, capsys, text, words):
    p = _write(tmp_path, text)
    rc = main(["pretrain", "--pipeline", str(p), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"wtours pretrain: error: {p}:"), err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("argv, words", [
    (["--pipeline", "nope"], ["pipeline not found", "tiny", "walking-tours"]),
    (["--pipeline", "tiny", "--set", "optim.lr=1"], ["names its stage first", "stage 1 alone: give --config"]),
    (["--pipeline", "tiny", "--set", "neco.optim.lrr=1"], ["stage 'neco'", "optim.lrr"]),
    (["--pipeline", "tiny", "--stages", "video,nope"], ["--stages: unknown stage 'nope'"]),
    (["--pipeline", "tiny", "--config", "video/tiny"], ["--pipeline", "--config", "give one kind"]),
    (["--pipeline", "tiny", "--max-steps", "3"], ["--max-steps", "video.trainer.max_steps"]),
    (["--pipeline", "tiny", "--video", "/no/such.mp4"], ["/no/such.mp4", "video not found"]),
])
def test_bad_command_line_is_one_line_exit_2(tmp_path, capsys, argv, words):
    rc = main(["pretrain", *argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_a_stage_whose_input_has_not_run_is_refused(tmp_path, capsys):
    rc = main(["pretrain", "--pipeline", "tiny", "--stages", "neco", "--out", str(tmp_path / "run"),
               "--set", "video.data.synth.seconds=3", "--set", "video.data.synth.width=160",
               "--set", "video.data.synth.height=90", "--set", "video.data.synth.sequences=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == (f"wtours pretrain: error: stage 'neco' takes the backbone of stage 'video', which "
                                   f"has not finished in {tmp_path / 'run'} (run it too: --stages video,neco)")


def _args(**kw):
    base = dict(config=None, init=None, frames=None, resume=None, pipeline=None, stages=None, davis=None, ytvos=None,
                images=None)
    return argparse.Namespace(**{**base, **kw})


def test_mode_rule():
    assert pipeline_mode(_args())  # wtours pretrain --video V: the whole chain
    assert pipeline_mode(_args(pipeline="tiny", davis="D"))
    for k in ("config", "init", "frames", "resume"):
        assert not pipeline_mode(_args(**{k: "x"}))  # stage 1 alone, as before
    with pytest.raises(UserError, match="give one kind"):
        pipeline_mode(_args(config="video/tiny", stages="video"))


def test_a_mistyped_set_key_is_blamed_on_the_command_line_not_the_pipeline_file(tmp_path):
    p = _write(tmp_path, GOOD)
    with pytest.raises(UserError) as e:
        load_pipeline(str(p), ["video.optim.lrr=1"])
    msg = str(e.value)
    assert msg.startswith("--set (stage 'video'): unknown config key 'optim.lrr'") and str(p) not in msg
    bad = _write(tmp_path, GOOD.replace("max_steps: 3", "max_stepz: 3"), "bad.yaml")
    with pytest.raises(UserError) as e:  # the file's own mistake still names the file, even with a good --set
        load_pipeline(str(bad), ["video.optim.lr=1e-4"])
    assert str(bad) in str(e.value) and "stage 'neco'" in str(e.value) and "max_stepz" in str(e.value)

"""``wtours bench learn``: the machinery of the proof that training learns (tiny, 2 seeds, 2 steps).

The numbers of such a short run mean nothing; these tests check that the table is computed from the
per-seed evaluations, written everywhere it should be, and that a re-run reuses finished seeds.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import pytest

from wtours.bench.learn import BEGIN, END, aggregate, goals, mean_std, replace_block, separation
from wtours.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1)
K = 4
MICRO = [
    "data.frames_per_clip=2", "data.stride=3", "data.short_side=64", "data.clips_per_epoch=12",
    "data.batch_size=2", "data.num_workers=0",
    "crops.precrop_size=48", "crops.global_size=32", "crops.local_size=16", "crops.local_number=2",
    "model.out_dim=128", "model.hidden_dim=64", "model.bottleneck_dim=32",
    "tracking.objects=2", "tracking.sinkhorn_iters=5",
    "optim.lr=0.002", "optim.lr_batch_reference=2", "optim.warmup_epochs=0.5", "optim.freeze_last_layer_epochs=0.25",
    "trainer.checkpoint_every=2", "trainer.log_every=1", "log.picture_every=0", "log.progress=false",
    "log.tensorboard=true",
    "data.synth.width=160", "data.synth.height=90", "data.synth.fps=10", "data.synth.seconds=3",
    "data.synth.sequences=2", "data.synth.seq_frames=3",
]
EVAL = ["input_size=[32, 48]", "eval_size=[16, 24]", "eval_size_dataset=[8, 12]", "niter=5", "restarts=1",
        "repeats=2", f"overcluster_k=[{K}]", "overlays=0", "gif=false", "progress=false", "workers=1"]


def _args(out: Path, readme: Path | None = None, json_copy: Path | None = None) -> list[str]:
    args = ["bench", "learn", "--seeds", *map(str, SEEDS), "--max-steps", "2", "--out", str(out), "--quiet",
            *sum((["--set", s] for s in MICRO), []), *sum((["--eval-set", s] for s in EVAL), [])]
    if readme is not None:
        args += ["--readme", str(readme)]
    if json_copy is not None:
        args += ["--json", str(json_copy)]
    return args


def _run(argv: list[str]) -> tuple[int, str, str, float]:
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue(), time.perf_counter() - t0


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proof")
    readme = tmp / "README.md"
    shutil.copy(REPO / "README.md", readme)
    out = tmp / "out"
    rc, stdout, stderr, seconds = _run(_args(out, readme, tmp / "copy.json"))
    assert rc == 0, stderr
    return {"out": out, "readme": readme, "stdout": stdout, "seconds": seconds, "tmp": tmp,
            "json": json.loads((out / "proof.json").read_text())}


def _metrics(out: Path, enc: str, seed: int, ds: str) -> dict:
    base = out / (f"seed{seed}" if enc == "trained" else f"random{seed}")
    return json.loads((base / "eval" / ds / "metrics.json").read_text())


def _score(m: dict, name: str) -> float:
    return m["overclustering"][name[2:]]["miou"] if name.startswith("K=") else m[name]


def test_proof_json_holds_per_seed_metrics_for_both_datasets_and_encoders(proof):
    p = proof["json"]
    for enc in ("trained", "random"):
        assert sorted(p["per_seed"][enc]) == [str(s) for s in SEEDS]
        for s in SEEDS:
            for ds in ("davis", "ytvos"):
                assert set(p["per_seed"][enc][str(s)][ds]) == {"F", "C", "D", f"K={K}"}
    assert p["settings"]["seeds"] == list(SEEDS) and p["settings"]["steps"] == 2
    assert p["settings"]["eval_sets"]["davis"]["sequences"] == 2  # data.synth.sequences reached synthesize
    assert "ddof=1" in p["settings"]["std"] and "sqrt" in p["settings"]["separation"]
    assert p["machine"]["cpu_count"] >= 1 and p["machine"]["torch"]
    assert p["wall_s"]["total"] > 0 and p["wall_s"]["this_invocation"] > 0
    assert {"synth", "seed0/train", "seed1/eval_ytvos", "random1/eval_davis"} <= set(p["wall_s"]["phases"])
    assert json.loads((proof["tmp"] / "copy.json").read_text())["aggregates"] == p["aggregates"]
    # the baseline is the random init of the same arch, seeded by the training seed
    from wtours.stages.video.run import load_pretrain_config

    arch = load_pretrain_config("video/proof", []).model.arch
    specs = {_metrics(proof["out"], "random", s, "davis")["encoder"]["spec"] for s in SEEDS}
    assert specs == {f"random:{arch}@{s}" for s in SEEDS}


def test_aggregates_are_recomputed_from_the_per_seed_metrics_files(proof):
    p, out = proof["json"], proof["out"]
    for ds in ("davis", "ytvos"):
        for name in ("F", "C", "D", f"K={K}"):
            row = p["aggregates"][ds][name]
            for enc in ("trained", "random"):
                vals = [_score(_metrics(out, enc, s, ds), name) for s in SEEDS]
                assert row[enc]["mean"] == pytest.approx(statistics.mean(vals), abs=1e-9)
                assert row[enc]["std"] == pytest.approx(statistics.stdev(vals), abs=1e-9)  # sample std
            diff = row["trained"]["mean"] - row["random"]["mean"]
            assert row["diff"] == pytest.approx(diff, abs=1e-9)
            pooled = math.sqrt((row["trained"]["std"] ** 2 + row["random"]["std"] ** 2) / 2)
            if pooled > 0:
                assert row["separation"] == pytest.approx(diff / pooled, rel=1e-9)
            else:
                assert row["separation"] is None
    for ds in ("davis", "ytvos"):
        c, f = p["aggregates"][ds]["C"], p["aggregates"][ds]["F"]
        expect = all(r["diff"] >= 10 and r["separation"] is not None and r["separation"] > 3 for r in (c, f))
        assert p["goals"][ds]["met"] is expect


def test_table_in_proof_md_and_stdout_shows_those_numbers(proof):
    p = proof["json"]
    md = (proof["out"] / "proof.md").read_text()
    for text in (md, proof["stdout"]):
        assert "| dataset | metric | random init | trained (stage 1) |" in text
        plain = text.replace(" (primary)", "").replace("**", "")
        rows = [(ds, ds, name) for ds in ("davis", "ytvos") for name in ("F", "C", "D", f"K={K}")]
        rows += [("dense", "davis", "J&F"), ("dense", "ytvos", "in-context"), ("dense", "ytvos", "linear")]
        for group, where, name in rows:
            row = p["aggregates"][group][name]
            cells = (f"{row['random']['mean']:.2f} ± {row['random']['std']:.2f}",
                     f"{row['trained']['mean']:.2f} ± {row['trained']['std']:.2f}", f"{row['diff']:+.2f}")
            assert f"| {where} | {name} | {cells[0]} | {cells[1]} | {cells[2]} |" in plain
        assert f"- {p['primary']['text']}" in text
        for ds in ("davis", "ytvos"):
            verdict = "met" if p["goals"][ds]["met"] else "not met"
            assert f"{ds}: C and F above random by >= 10 points and > 3 std apart: **{verdict}**" in text
        assert "sample standard deviation" in text
    assert "wall time" in md and "CPU cores" in md


def test_proof_png_is_a_picture(proof):
    from PIL import Image

    path = proof["out"] / "proof.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] >= 600 and im.size[1] >= 300
        px = im.convert("RGB")
        colours = {px.getpixel((x, y)) for x in range(0, im.size[0], 3) for y in range(0, im.size[1], 3)}
        assert (31, 119, 180) in colours  # the trained bars (matplotlib's tab:blue)


def test_readme_block_is_replaced_and_nothing_else(proof):
    old = (REPO / "README.md").read_text()
    new = proof["readme"].read_text()
    assert old.count(BEGIN) == 1 and old.count(END) == 1
    assert new.split(BEGIN)[0] == old.split(BEGIN)[0]
    assert new.split(END)[1] == old.split(END)[1]
    block = new.split(BEGIN)[1].split(END)[0].replace(" (primary)", "").replace("**C**", "C")
    row = proof["json"]["aggregates"]["davis"]["C"]
    assert f"| davis | C | {row['random']['mean']:.2f} ± {row['random']['std']:.2f} |" in block
    assert "wtours bench learn" in block and proof["json"]["date"][:10] in block and "wall time" in block


def test_a_second_run_reuses_finished_seeds(proof):
    out = proof["out"]
    watched = [out / f"seed{s}" / "stage1" / "backbone.pt" for s in SEEDS]
    watched += [out / f"{kind}{s}" / "eval" / ds / "metrics.json"
                for kind in ("seed", "random") for s in SEEDS for ds in ("davis", "ytvos")]
    before = {p: p.stat().st_mtime_ns for p in watched}
    rc, stdout, stderr, seconds = _run(_args(out))
    assert rc == 0, stderr
    assert {p: p.stat().st_mtime_ns for p in watched} == before  # nothing recomputed
    again = json.loads((out / "proof.json").read_text())
    assert again["aggregates"] == proof["json"]["aggregates"] and again["per_seed"] == proof["json"]["per_seed"]
    phases = again["wall_s"]["phases"]
    assert all(v["reused"] for v in phases.values()), phases
    # a reused phase reports what it cost when it ran
    assert phases["seed0/train"]["seconds"] == pytest.approx(proof["json"]["wall_s"]["phases"]["seed0/train"]["seconds"])
    assert seconds < proof["seconds"]


def test_collapse_signals_reach_metrics_csv_tensorboard_and_the_report(proof):
    import csv

    run = proof["out"] / "seed0"
    keys = ["train/teacher_entropy", "train/teacher_batch_entropy", "train/kl", "train/prototypes_used",
            "train/center_norm", "train/feature_std", "train/mask_coverage"]
    with open(run / "stage1" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for k in keys:
        assert any(r.get(k) not in (None, "") for r in rows), k
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "stage1" / "tb"))
    acc.Reload()
    assert set(keys) <= set(acc.Tags()["scalars"])
    report = (run / "report.md").read_text()
    assert "### Collapse signals" in report and "log C = 4.852" in report  # C = model.out_dim = 128
    for k in keys:
        assert f"| `{k}` |" in report
    assert (run / "stage1" / "collapse.png").is_file() and "stage1/collapse.png" in report


def test_readme_without_markers_is_refused_before_any_work(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no block here\n")
    rc = main(_args(tmp_path / "out", readme))
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(readme) in err and BEGIN in err
    assert not (tmp_path / "out").exists()
    assert readme.read_text() == "# no block here\n"


@pytest.mark.parametrize("extra, needle", [
    (["--seeds", "0", "0"], "--seeds: each seed once"),
    (["--set", "data.synth.sequences=0"], "data.synth.sequences"),
    (["--set", "data.synth.seq_frames=0"], "data.synth.seq_frames: must be >= 1"),
    (["--eval-set", "niter=0"], "niter must be >= 1"),
])
def test_bad_settings_are_one_line_exit_2(tmp_path, capsys, extra, needle):
    rc = main(["bench", "learn", "--out", str(tmp_path / "out"), "--quiet", *extra])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err, err


# ------------------------------------------------------------------------------------------ the statistics


def test_statistics_helpers():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std
    assert mean_std([5.0]) == (5.0, None)
    assert separation(30.0, 2.0, 20.0, 2.0) == pytest.approx(5.0)
    assert separation(30.0, 3.0, 20.0, 1.0) == pytest.approx(10 / math.sqrt(5))
    assert separation(30.0, None, 20.0, 1.0) is None and separation(1.0, 0.0, 0.0, 0.0) is None
    assert replace_block(f"a\n{BEGIN}\nold\n{END}\nb\n", "new") == f"a\n{BEGIN}\nnew\n{END}\nb\n"


def test_goal_needs_ten_points_and_three_std_on_c_and_f():
    def per_seed(trained_c, trained_f):
        ps = {"trained": {}, "random": {}}
        for i, s in enumerate((0, 1, 2)):
            for enc, c, f in (("random", [20, 21, 22], [20, 21, 22]), ("trained", trained_c, trained_f)):
                ps[enc][str(s)] = {ds: {"F": float(f[i]), "C": float(c[i]), "D": 0.0} for ds in ("davis", "ytvos")}
        return ps

    met = goals(aggregate(per_seed([33, 34, 35], [31, 32, 33]), (0, 1, 2), ["F", "C", "D"]))
    assert met["davis"]["met"] and met["ytvos"]["met"]
    close = goals(aggregate(per_seed([33, 34, 35], [29, 30, 31]), (0, 1, 2), ["F", "C", "D"]))  # F: +9 points
    assert not close["davis"]["met"] and "not met" in close["davis"]["text"]
    noisy = goals(aggregate(per_seed([20, 34, 48], [31, 32, 33]), (0, 1, 2), ["F", "C", "D"]))  # C: +13 points, 1.3 std
    assert not noisy["davis"]["met"]
    assert noisy["davis"]["checks"]["C"]["points_ok"] and not noisy["davis"]["checks"]["C"]["separation_ok"]


def test_dense_rows_are_the_scores_the_instruments_wrote(proof):
    p, out = proof["json"], proof["out"]
    for enc, base in (("trained", "seed{s}"), ("random", "random{s}")):
        for s in SEEDS:
            cached = json.loads((out / base.format(s=s) / "eval" / "dense" / "scores.json").read_text())
            assert p["per_seed"][enc][str(s)]["dense"] == cached["scores"]
            assert set(cached["scores"]) == {"J&F", "in-context", "linear"}
            assert all(0.0 <= v <= 100.0 for v in cached["scores"].values())
        vals = [p["per_seed"][enc][str(s)]["dense"]["J&F"] for s in SEEDS]
        assert p["aggregates"]["dense"]["J&F"][enc]["mean"] == pytest.approx(statistics.mean(vals), abs=1e-9)


def test_primary_instrument_is_the_widest_calibrated_range():
    from wtours.bench.learn import primary_instrument, primary_verdict

    cal = {"aggregate": {"dynamic_range": {
        "C": {"row": "supervised", "points": 9.0, "std_units": 12.0},
        "J&F": {"row": "supervised", "points": 6.0, "std_units": 30.0},
        "linear": {"row": "supervised", "points": 20.0, "std_units": None}}}}
    name, rng = primary_instrument(cal)
    assert name == "J&F" and rng["points"] == 6.0
    assert primary_instrument(None) == ("C", {})
    agg = {"dense": {"J&F": {"diff": 3.0, "separation": 4.0}}}
    v = primary_verdict(agg, name, rng)
    assert v["met"] is True and v["range_closed"] == pytest.approx(0.5)
    assert "**J&F**" in v["text"] and "50 % of the supervised − random range" in v["text"]
    weak = primary_verdict({"dense": {"J&F": {"diff": 3.0, "separation": 2.0}}}, name, rng)
    assert weak["met"] is False and "not met" in weak["text"]


def test_dense_instruments_need_two_sequences_before_any_training(tmp_path, capsys):
    rc = main(["bench", "learn", "--seeds", "0", "--out", str(tmp_path / "o"), "--quiet",
               "--set", "data.synth.sequences=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "data.synth.sequences" in err and ">= 2 evaluation sequences" in err and "--instruments clustering" in err
    assert not (tmp_path / "o" / "seed0").exists()


NECO_MICRO = ["data.frames=16", "data.image_size=64", "data.frame_short_side=64", "data.batch_size=4",
              "crops.global_size=32", "crops.local_size=16", "loss.roi_size=2", "loss.queue_length=64",
              "trainer.checkpoint_every=2", "trainer.log_every=1", "log.picture_every=0", "log.progress=false",
              "log.tensorboard=false", "trainer.cpu_threads=1"]


def test_neco_chain_post_pretrains_each_seeds_backbone_and_writes_its_own_readme_block(proof, tmp_path):
    """``--neco CONFIG --init-from DIR``: seed s is NeCo started from DIR/seed<s>/stage1/backbone.pt, scored
    against the same random init; ``--readme-block`` writes its own block and leaves the proof block alone."""
    import torch

    readme = tmp_path / "README.md"
    readme.write_text("head\n<!-- proof:begin -->\nPROOF\n<!-- proof:end -->\n<!-- neco:begin -->\nold\n"
                      "<!-- neco:end -->\ntail\n")
    out = tmp_path / "neco"
    argv = [*_args(out, readme), "--init-from", str(proof["out"]), "--neco", "neco/tiny", "--readme-block", "neco",
            *sum((["--neco-set", s] for s in NECO_MICRO), [])]
    rc, stdout, stderr, _ = _run(argv)
    assert rc == 0, stderr
    res = json.loads((out / "proof.json").read_text())
    for s in SEEDS:
        bb = torch.load(out / f"seed{s}" / "stage2" / "backbone.pt", weights_only=True)
        assert bb["meta"]["stage"] == "neco" and bb["meta"]["steps"] == 2
        assert bb["meta"]["init"] == str((proof["out"] / f"seed{s}" / "stage1" / "backbone.pt").resolve())
        assert res["runs"][str(s)]["backbone"].endswith(f"seed{s}/stage2/backbone.pt")
        assert res["runs"][str(s)]["random_spec"] == f"random:vit_nano_patch8_64@{s}"
        assert not (out / f"seed{s}" / "stage1").exists()
        # the NeCo backbone differs from the stage-1 one it started from
        sd0 = torch.load(proof["out"] / f"seed{s}" / "stage1" / "backbone.pt", weights_only=True)["state_dict"]
        assert any(not torch.equal(v, sd0[k]) for k, v in bb["state_dict"].items())
    # the random rows are the proof's own (same init seeds, same eval sets and configs)
    for s in SEEDS:
        assert res["per_seed"]["random"][str(s)] == proof["json"]["per_seed"]["random"][str(s)]
    assert res["settings"]["neco"] == "neco/tiny" and "--neco neco/tiny" in res["command"]
    assert "trained (NeCo)" in stdout and "NeCo (`neco/tiny`" in stdout
    text = readme.read_text()
    assert text.startswith("head\n<!-- proof:begin -->\nPROOF\n<!-- proof:end -->\n<!-- neco:begin -->\n")
    assert "trained (NeCo)" in text and "old" not in text and text.endswith("<!-- neco:end -->\ntail\n")
    # a second run reuses both NeCo seeds
    rc, _, stderr, _ = _run([a for a in argv if a != "--quiet"])
    assert rc == 0, stderr
    assert stderr.count("exists (same NeCo config): reused") == len(SEEDS)


@pytest.mark.parametrize("extra, needle", [
    (["--neco", "neco/tiny"], "--neco: give --init-from"),
    (["--neco-set", "seed=1"], "--neco-set: only with --neco"),
    (["--readme-block", "a b"], "--readme-block: letters"),
])
def test_neco_chain_options_are_checked_first(tmp_path, capsys, extra, needle):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- proof:begin -->\n<!-- proof:end -->\n")
    rc = main(["bench", "learn", "--out", str(tmp_path / "out"), "--quiet", "--readme", str(readme), *extra])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err, err
    assert not (tmp_path / "out").exists()


def test_a_neco_seed_killed_under_another_config_is_refused_with_one_line(proof, tmp_path, capsys):
    """A ``stage2/last.ckpt`` left by another NeCo config is not continued: one line naming the seed's folder."""
    out = tmp_path / "neco"
    argv = ["bench", "learn", "--seeds", "0", "--max-steps", "2", "--out", str(out), "--quiet",
            *sum((["--set", s] for s in MICRO), []), *sum((["--eval-set", s] for s in EVAL), []),
            "--init-from", str(proof["out"]), "--neco", "neco/tiny", *sum((["--neco-set", s] for s in NECO_MICRO), [])]
    assert main(argv) == 0
    (out / "seed0" / "stage2" / "backbone.pt").unlink()  # as if killed before the export
    capsys.readouterr()
    assert main([*argv, "--neco-set", "loss.queue_length=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "last.ckpt" in err and f"delete {out / 'seed0'}" in err, err
    assert (out / "seed0" / "stage2" / "last.ckpt").is_file()  # nothing lost

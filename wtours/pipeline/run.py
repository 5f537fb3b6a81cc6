"""Run a pipeline (:mod:`wtours.pipeline.spec`) stage by stage into one run directory, resumably.

    wtours pretrain --video venice.mp4                       # pipelines/walking-tours.yaml into runs/walking-tours
    wtours pretrain --pipeline tiny --out runs/demo          # the CPU demo on a synthetic tour (make demo)

Run directory (``--out``, default ``runs/<pipeline name>``)::

    pipeline.yaml               the resolved pipeline: stages, configs, overrides, inputs, data, command
    data/synth/                 the synthetic tour (no --video) and its DAVIS-layout ground truth
    <stage>/status.json         pending / running / done, fingerprint, backbone + checksum, times
    <video stage>/              a stage-1 run directory (config.yaml, stage1/{last.ckpt, backbone.pt, ...})
    <neco stage>/               a stage-2 run directory (config_neco.yaml, stage2/{last.ckpt, backbone.pt, ...})
    <eval stage>/metrics.json   the stage's table; <eval stage>/<dataset>/trained/ the evaluation itself
    random/<dataset>/<arch>@<seed>/   the random-init baseline (shared by the eval stages, reused)
    report.md, report.html      the report (:mod:`wtours.report`)

A stage is skipped when its status is ``done`` with the same fingerprint (its config, as the resume check
of its trainer sees it, and the checksum of the backbone it takes); a ``running`` stage with the same
fingerprint continues from its ``last.ckpt`` (exact resume of stage 1 / stage 2); a stage whose config
changed is re-run from scratch (its old checkpoint set aside), which changes its backbone and so re-runs
every stage after it. Paths inside the run directory enter the fingerprint relative to it, so a moved or
copied run directory keeps its finished stages.

Under ``torchrun`` / SLURM every rank runs the training stages (Lightning DDP); only rank 0 writes
statuses and the report and runs the eval stages.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from wtours.errors import ConfigError, UserError
from wtours.rundir import STAGE_SUBDIR
from wtours.fsutil import ensure_dir, write_json, write_text
from wtours.pipeline.spec import Pipeline, Stage, load_stage_config
from wtours.config import changed_keys, flatten
from wtours.pipeline.status import (backbone_checksum, digest, fingerprint, now,
                                    read_status, write_status)

RANK_WAIT_S = 6 * 3600.0  # how long ranks > 0 wait for rank 0 to finish a stage (and its eval stages)


def _say(msg: str) -> None:
    print(f"pipeline: {msg}", file=sys.stderr, flush=True)


def _rel(path: str | Path, out: Path) -> str:
    """``path`` relative to the run directory when inside it (POSIX), else absolute."""
    p = Path(path).resolve()
    try:
        return p.relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(p)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _close_process_group() -> None:
    """Under torchrun / srun: wait for every rank (rank 0 ran the eval stages alone), then close the process
    group that the training stages' DDP opened, so that no rank exits with its communication threads alive
    (an abort at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class PipelineRun:
    """One invocation: the data, the stage configs and their fingerprints, the stages run in order."""

    def __init__(self, pipe: Pipeline, out: str | Path, stages: Sequence[Stage] | None = None,
                 videos: Sequence[str] = (), images: str | None = None, davis: str | None = None,
                 ytvos: str | None = None, devices: Any = None, num_nodes: int | None = None,
                 trust: bool = False, fresh: bool = False, progress: bool | None = None,
                 callbacks: dict[str, Sequence[Any]] | None = None, command: str = "") -> None:
        from wtours.train.stage_run import launch_rank_zero

        self.pipe, self.out = pipe, Path(out)
        self.selected = list(stages) if stages is not None else list(pipe.stages)
        self.videos = [str(Path(v).resolve()) for v in videos]
        self.images = str(Path(images).resolve()) if images else None
        self.davis, self.ytvos = davis, ytvos
        self.devices, self.num_nodes, self.trust, self.fresh = devices, num_nodes, trust, fresh
        self.progress, self.callbacks, self.command = progress, dict(callbacks or {}), command
        self.main = launch_rank_zero()
        self.say = _say if self.main else (lambda msg: None)  # ranks > 0 stay quiet
        self.datasets: list[tuple[str, str, Path]] = []  # (kind, label, root)
        self.docs: dict[str, dict] = {}

    # ------------------------------------------------------------------------------------------- data

    def _check_inputs(self) -> None:
        for v in self.videos:
            if not Path(v).is_file():
                raise UserError("video not found" if not Path(v).exists() else "not a file", path=v)
        for flag, root in (("--images", self.images), ("--davis", self.davis), ("--ytvos", self.ytvos)):
            if root and not Path(root).is_dir():
                raise UserError(f"{flag}: folder not found" if not Path(root).exists() else f"{flag}: not a folder",
                                path=root)

    def prepare_data(self) -> None:
        """The training videos (``--video`` or the synthetic tour) and the evaluation sets (``--davis`` /
        ``--ytvos``, else the synthetic tour's DAVIS-layout ground truth)."""
        from wtours.stages.video.run import synth_videos

        self._check_inputs()
        root_cfg = load_stage_config(self.pipe.stages[0])  # the first stage is a video stage (spec)
        evals = any(s.kind == "eval" for s in self.selected)
        need_synth_gt = evals and not (self.davis or self.ytvos)
        if need_synth_gt and root_cfg.data.synth.sequences < 1:
            raise ConfigError(f"stage '{self.pipe.stages[0].name}': data.synth.sequences is 0, but the evaluation "
                              "needs the synthetic tour's ground truth (give --davis / --ytvos, or sequences >= 1)")
        if not self.videos or need_synth_gt:
            why = ("no --video given" if not self.videos else
                   "no --davis / --ytvos given: its DAVIS-layout ground truth is the evaluation set")
            tour = synth_videos(root_cfg, self.out, progress=self.progress is not False, why=why)
            if not self.videos:
                self.videos = [str(Path(v).resolve()) for v in tour]
        if self.davis:
            self.datasets.append(("davis", "davis", Path(self.davis).resolve()))
        if self.ytvos:
            self.datasets.append(("ytvos", "ytvos", Path(self.ytvos).resolve()))
        if not self.datasets:
            self.datasets.append(("davis", "synthetic tour (DAVIS layout)",
                                  (self.out / "data" / "synth" / "davis").resolve()))
        self._check_stage_data()

    def _check_stage_data(self) -> None:
        """What later stages read, checked before the first trains: NeCo's ``--images`` and the evaluation sets
        (read as each selected eval stage's config reads them)."""
        if self.images and any(s.kind == "neco" for s in self.selected):
            from wtours.stages.neco.data import ImageFolder

            try:
                ImageFolder(self.images, 64)
            except UserError as e:
                raise UserError(f"--images: {str(e).removeprefix(f'{self.images}: ')}", path=self.images) from None
        from wtours.eval.datasets import read_dataset

        for stage in (s for s in self.selected if s.kind == "eval"):
            cfg = load_stage_config(stage)
            for kind, label, root in self.datasets:
                if label in ("davis", "ytvos"):  # the synthetic ground truth was written just now
                    read_dataset(kind, root, None, cfg.frames_per_clip, cfg.max_instance_id, cfg.split_seed,
                                 cfg.missing_annotations, cfg.frame_sampling, cfg.seed, cfg.davis_annotations)

    def write_resolved(self) -> None:
        import yaml

        doc = {"name": self.pipe.name, "source": str(self.pipe.path), "description": self.pipe.description,
               "command": self.command,
               "stages": {s.name: {"kind": s.kind, "config": s.config, "set": list(s.overrides), "input": s.input}
                          for s in self.pipe.stages},
               "selected": [s.name for s in self.selected],
               "data": {"videos": [_rel(v, self.out) for v in self.videos],
                        "neco_images": self.images or "frames of the videos",
                        "eval": [{"dataset": k, "label": lab, "root": _rel(r, self.out)} for k, lab, r in self.datasets]}}
        write_text(self.out / "pipeline.yaml", yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))

    # ------------------------------------------------------------------------------------------- configs

    def stage_dir(self, stage: Stage | str) -> Path:
        return self.out / (stage if isinstance(stage, str) else stage.name)

    def input_of(self, stage: Stage) -> tuple[Path | None, dict]:
        """The backbone a stage takes and its input stage's status (``(None, {})`` for a root stage)."""
        if stage.input is None:
            return None, {}
        st = read_status(self.stage_dir(stage.input))
        waited = 0.0
        while not self.main and st.get("state") != "done" and waited < RANK_WAIT_S:
            time.sleep(1.0)  # ranks > 0: rank 0 exports the input's backbone, then marks it done
            waited += 1.0
            st = read_status(self.stage_dir(stage.input))
        bb = self.out / st["backbone"] if st.get("backbone") else None
        if st.get("state") != "done" or bb is None or not bb.is_file():
            raise UserError(f"stage '{stage.name}' takes the backbone of stage '{stage.input}', which has not "
                            f"finished in {self.out} (run it too: --stages {stage.input},{stage.name})")
        return bb, st

    def config_of(self, stage: Stage, input_bb: Path | None) -> tuple[Any, dict]:
        """The stage's config (data and input filled in) and the view of it that its fingerprint covers."""
        from wtours.config import to_dict

        init = str(input_bb) if input_bb else None
        cfg = load_stage_config(stage, videos=self.videos, init=init, images=self.images,
                                frames_from=() if self.images else self.videos)
        if stage.kind == "video":
            from wtours.stages.video.config import training_view

            view = training_view(to_dict(cfg))
            view["videos"] = [_rel(v, self.out) for v in cfg.videos]
            view["model"] = {k: v for k, v in view["model"].items() if k != "init"}  # the input checksum covers it
        elif stage.kind == "neco":
            from wtours.stages.neco.config import neco_training_view

            view = neco_training_view(to_dict(cfg))
            view.pop("init", None)
            view["frames_from"] = [_rel(v, self.out) for v in cfg.frames_from]
            view["images"] = _rel(cfg.images, self.out) if cfg.images else ""
        else:
            from wtours.eval.cli import eval_key

            view = {**eval_key(to_dict(cfg)), "datasets": [[k, _rel(r, self.out)] for k, _, r in self.datasets]}
        return cfg, view

    # ------------------------------------------------------------------------------------------- the run

    def run(self) -> dict[str, Any]:
        self.prepare_data()
        if self.main:
            ensure_dir(self.out)
            self.write_resolved()
            for s in self.pipe.stages:
                if not (self.stage_dir(s) / "status.json").is_file():
                    write_status(ensure_dir(self.stage_dir(s)), {"stage": s.name, "kind": s.kind, "state": "pending"})
            chain = " -> ".join(s.name for s in self.selected)
            self.say(f"{self.pipe.name} ({self.pipe.path.name}) into {self.out}: {chain}; training on "
                 f"{len(self.videos)} video(s), evaluating on {', '.join(lab for _, lab, _ in self.datasets)}")
        n = len(self.selected)
        for i, stage in enumerate(self.selected, 1):
            if stage.kind == "eval" and not self.main:
                continue
            self.run_stage(stage, f"[{i}/{n}] {stage.name}")
        _close_process_group()
        result: dict[str, Any] = {"out": str(self.out), "stages": {}}
        if self.main:
            from wtours.report.chain import write_reports
            from wtours.report.tables import summary_rows, text_table

            docs = self.eval_docs()
            if docs:
                names, rows = summary_rows(docs)
                result["table"] = text_table(names, rows)
            result["stages"] = {s.name: read_status(self.stage_dir(s)) for s in self.pipe.stages}
            result["report"] = [str(p) for p in write_reports(self.out)]
        return result

    def eval_docs(self) -> list[dict]:
        """The metrics.json of every finished eval stage, in pipeline order."""
        import json

        docs = []
        for s in self.pipe.stages:
            if s.kind != "eval" or read_status(self.stage_dir(s)).get("state") != "done":
                continue
            try:
                docs.append(json.loads((self.stage_dir(s) / "metrics.json").read_text()))
            except (OSError, ValueError):
                continue
        return docs

    def run_stage(self, stage: Stage, tag: str) -> None:
        d = self.stage_dir(stage)
        input_bb, input_st = self.input_of(stage)
        try:
            cfg, view = self.config_of(stage, input_bb)
        except UserError as e:
            raise UserError(f"stage '{stage.name}': {e}") from None
        cdigest = digest(view)
        fp = fingerprint(cdigest, input_st.get("backbone_checksum"))
        st = read_status(d)
        if st.get("config_digest") and st["config_digest"] != cdigest and self.main:
            keys = changed_keys(st.get("config"), flatten(view))
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            later = self.pipe.downstream(stage.name)
            self.say(f"stage '{stage.name}': config changed since the last run ({shown or 'config'}): re-running it"
                 + (f" and every stage after it ({', '.join(later)})" if later else ""))
        if not self.fresh and self.is_done(stage, st, fp):
            self.say(f"{tag}: done earlier ({_fmt_s(st.get('seconds'))}): skipped")
            return
        same = st.get("fingerprint") == fp and not self.fresh
        status = {"stage": stage.name, "kind": stage.kind, "state": "running", "fingerprint": fp,
                  "config_digest": cdigest, "config": flatten(view),
                  "input": {"stage": stage.input, "backbone_checksum": input_st.get("backbone_checksum")}
                  if stage.input else None,
                  "config_file": stage.config, "overrides": list(stage.overrides),
                  "started": st.get("started") if same else now(), "finished": None,
                  "seconds": float(st.get("seconds") or 0.0) if same else 0.0,
                  "runs": int(st.get("runs") or 0) + 1 if same else 1}
        if self.main:
            write_status(ensure_dir(d), status)
        t0 = time.perf_counter()
        try:
            if stage.kind == "eval":
                extra = self.run_eval(stage, cfg, input_bb, input_st, tag)
            else:
                extra = self.run_training(stage, cfg, same, tag)
        finally:
            status["seconds"] += time.perf_counter() - t0
            if self.main:
                write_status(d, status)  # still "running" when interrupted: the next run continues it
        status.update(extra, state="done", finished=now())
        if self.main:
            write_status(d, status)
        self.say(f"{tag}: done in {_fmt_s(status['seconds'])}"
             + (f", backbone {status['backbone']}" if status.get("backbone") else ""))

    def is_done(self, stage: Stage, st: dict, fp: str) -> bool:
        if st.get("state") != "done" or st.get("fingerprint") != fp:
            return False
        if stage.kind == "eval":
            return (self.stage_dir(stage) / "metrics.json").is_file()
        bb = self.out / st.get("backbone", "")
        return bool(st.get("backbone")) and backbone_checksum(bb)[0] == st.get("backbone_checksum")

    def run_training(self, stage: Stage, cfg: Any, same: bool, tag: str) -> dict[str, Any]:
        """Stage 1 / stage 2 into the stage folder: continue its ``last.ckpt`` when the fingerprint is the
        same, else start over (an old ``stage1/`` / ``stage2/`` is set aside by the trainer's ``fresh``)."""
        d = self.stage_dir(stage)
        sub = d / STAGE_SUBDIR[stage.kind]
        resume = "last" if same and (sub / "last.ckpt").is_file() else None
        fresh = resume is None and sub.exists()
        self.say(f"{tag}: {stage.kind} stage, config {stage.config}"
             + (f", overrides {' '.join(stage.overrides)}" if stage.overrides else "")
             + (f", from {stage.input}'s backbone" if stage.input else "")
             + ("; continuing its last checkpoint" if resume else ""))
        kwargs = dict(resume=resume, devices=self.devices, num_nodes=self.num_nodes, fresh=fresh, trust=self.trust,
                      extra_callbacks=self.callbacks.get(stage.name, ()), progress=self.progress)
        if stage.kind == "video":
            from wtours.stages.video.run import run_pretrain

            summary = run_pretrain(cfg, d, **kwargs)
        else:
            from wtours.stages.neco.run import run_neco

            summary = run_neco(cfg, d, **kwargs)
        bb = sub / "backbone.pt"
        checksum, arch = backbone_checksum(bb) if self.main else (None, None)
        first, last = summary.get("first_loss"), summary.get("last_loss")
        if self.main and first is not None and last is not None:
            self.say(f"{tag}: loss {first:.4f} -> {last:.4f} after {summary.get('steps')} steps")
        return {"backbone": _rel(bb, self.out), "backbone_checksum": checksum, "arch": arch, "seed": cfg.seed,
                "steps": summary.get("steps")}

    def run_eval(self, stage: Stage, cfg: Any, input_bb: Path, input_st: dict, tag: str) -> dict[str, Any]:
        """The input backbone and the ``random:`` baseline of the same arch on every evaluation set."""
        from wtours.eval.cli import evaluate_clustering, reusable_metrics
        from wtours.eval.report import scores_of
        from wtours.report.tables import stage_doc, stage_rows, text_table

        if self.progress is False:
            cfg.progress = False
        d = self.stage_dir(stage)
        arch = input_st.get("arch") or "?"
        root_stage = self.pipe.chain(stage.name)[-1]
        seed = read_status(self.stage_dir(root_stage)).get("seed", 0)
        random_spec = f"random:{arch}@{seed}"
        names = ["F", "C", "D", *(f"K={k}" for k in cfg.overcluster_k)]
        datasets: dict[str, dict] = {}
        for kind, label, root in self.datasets:
            key = kind if label in ("davis", "ytvos") else "synth"
            encoders = {}
            for enc, spec, out_dir in (("random", random_spec, self.out / "random" / key / f"{arch}@{seed}"),
                                       ("trained", str(input_bb), d / key / "trained")):
                m = reusable_metrics(out_dir, kind, root, spec, cfg) if enc == "random" else None
                if m is None:
                    self.say(f"{tag}: clustering {spec if enc == 'random' else _rel(spec, self.out)} on {label}")
                    m = evaluate_clustering(kind, root, spec, out_dir, copy.deepcopy(cfg), verbose=False,
                                            trust=self.trust)
                encoders[enc] = {"spec": spec if enc == "random" else _rel(spec, self.out),
                                 "scores": scores_of(m, cfg.overcluster_k),
                                 "metrics": _rel(out_dir / "metrics.json", self.out),
                                 "overlays": [_rel(out_dir / p, self.out) for p in m.get("pictures", [])
                                              if str(p).endswith(".png")]}
            datasets[key] = {"label": label, "root": _rel(root, self.out), "n_sequences": m.get("n_sequences"),
                             "n_frames": m.get("n_frames"), "encoders": encoders}
            self._dense_rows(kind, label, root, datasets[key], cfg, (random_spec, str(input_bb)),
                             (self.out / "random" / key / f"{arch}@{seed}" / "dense", d / key / "trained" / "dense"),
                             tag, names)
        doc = stage_doc(stage.name, stage.input, arch, names, datasets)
        write_json(d / "metrics.json", doc)
        print(f"{stage.name}: {stage.input} vs random init, mIoU %")
        print(text_table(names, stage_rows(doc)), flush=True)
        return {"metrics": _rel(d / "metrics.json", self.out), "arch": arch}


    def _dense_rows(self, kind: str, label: str, root: Path, entry: dict, cfg: Any, specs: tuple[str, str],
                    outs: tuple[Path, Path], tag: str, names: list[str]) -> None:
        """Add the dense instruments' scores (J&F, in-context, linear) of the random and trained encoders to one
        dataset's entry, where its layout allows; scores are cached per encoder in ``<out>/scores.json``."""
        from wtours.config import load_config, to_dict
        from wtours.eval.incontext import InContextConfig, evaluate_incontext
        from wtours.eval.linear_probe import LinearConfig, evaluate_linear
        from wtours.eval.propagation import PropagationConfig, evaluate_propagation

        synthetic = label.startswith("synthetic")
        jobs = []  # (metric, instrument function, config, dataset kind, root)
        quiet = ["progress=false", "overlays=1"]
        if "propagation" in cfg.dense and kind == "davis":
            jobs.append(("J&F", evaluate_propagation, load_config(PropagationConfig, cfg.propagation_config, quiet),
                         kind, root))
        cat_kind, cat_root = ("synth", root.parent) if synthetic else (kind, root)
        if kind == "ytvos" or (synthetic and (root.parent / "ytvos").is_dir()):
            if "incontext" in cfg.dense:
                jobs.append(("in-context", evaluate_incontext,
                             load_config(InContextConfig, cfg.incontext_config, quiet), cat_kind, cat_root))
            if "linear" in cfg.dense:
                jobs.append(("linear", evaluate_linear, load_config(LinearConfig, cfg.linear_config, quiet),
                             cat_kind, cat_root))
        for metric, *_ in jobs:
            if metric not in names:
                names.append(metric)
        for (enc, spec), out_dir in zip(zip(("random", "trained"), specs), outs):
            key = {"spec": spec,
                   "configs": {m: [to_dict(c), k, str(r)] for m, _, c, k, r in jobs}}
            cache = out_dir / "scores.json"
            try:
                old = json.loads(cache.read_text())
            except (OSError, ValueError):
                old = None
            if enc == "random" and isinstance(old, dict) and old.get("key") == key:
                scores = old["scores"]
            else:
                scores = {}
                for metric, fn, c, k, r in jobs:
                    self.say(f"{tag}: {metric} of {spec if enc == 'random' else _rel(spec, self.out)} on {label}")
                    m = fn(k, r, spec, out_dir / metric.replace("&", "").lower(), copy.deepcopy(c), verbose=False,
                           trust=self.trust)
                    scores[metric] = m["J&F"] if metric == "J&F" else m["mIoU"]
                write_json(cache, {"key": key, "scores": scores})
            entry["encoders"][enc]["scores"].update(scores)


def run_pipeline(pipe: Pipeline, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run (or continue) ``pipe`` into ``out``; see :class:`PipelineRun` for the keyword arguments."""
    return PipelineRun(pipe, out, **kwargs).run()

"""Stage 1 (``wtours pretrain``, :mod:`wtours.commands.pretrain`): video pretraining of a ViT from scratch
(DoRA and/or TimeT), as hooks on the stage engine (:mod:`wtours.train.engine`).

Without any of ``--config``, ``--init``, ``--frames``, ``--resume`` the command runs a pipeline instead (the whole
chain, :mod:`wtours.pipeline.run`); with one of them, stage 1 alone as described here.

    wtours pretrain --video venice.mp4 --config configs/video/dora_vits16.yaml --out runs/venice
    wtours pretrain --out runs/demo --config configs/video/tiny.yaml      # synthetic tour, CPU

Writes into the run directory ``--out`` (default ``runs/<config name>``)::

    config.yaml                 the resolved config (videos included)
    stage1/last.ckpt            training checkpoint (every trainer.checkpoint_every steps + at the end; atomic)
    stage1/metrics.csv          per-step metrics (CSV; TensorBoard events in stage1/tb/)
    stage1/pictures/*.png       tracked object masks on a fixed clip, every log.picture_every steps
    stage1/backbone.pt          the teacher backbone, loadable by timm (written when the run completes)
    report.md                   summary (``wtours report RUN_DIR`` rewrites it)
    data/synth/                 the synthetic walking tour, when no --video is given (with DAVIS- and
                                YTVOS-layout evaluation sets of data.synth.sequences x seq_frames frames)

``--resume`` continues a killed run from ``stage1/last.ckpt`` (or a given checkpoint) exactly:
weights, optimizer, schedules, teacher, centre, position in the clip stream, random streams.
Checkpoints are verified (checksum) and read with ``weights_only=True``; a foreign checkpoint that
needs pickle is read only with ``--trust-checkpoint``. ``--fresh`` moves an existing ``stage1/``
aside (``stage1.old-<time>``) and deletes it once the new run has saved its first checkpoint, so a
killed ``--fresh`` never lets a later re-run continue the old run. Temp files of killed writes are
removed at start-up. A loss or weights that become non-finite stop the run (:mod:`wtours.train.guard`):
the last good checkpoint stays, nothing is exported, exit status 2.
Multi-GPU / multi-node: ``--devices N --num-nodes M`` (DDP; SLURM ``srun`` and ``torchrun`` are
detected by Lightning).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from wtours.config import load_config
from wtours.errors import UserError
from wtours.fsutil import ensure_dir
from wtours.stages.video.config import VideoPretrainConfig, training_hash, training_view
from wtours.train.engine import Built, Stage, StageRun, run_stage, wait_for_local_rank_zero

OOM_HINT = ("lower data.batch_size (e.g. --set data.batch_size=8, with trainer.accumulate_grad_batches=2 to keep "
            "the batch), crops.local_number, tracking.objects or model.arch (e.g. vit_tiny_patch16_224)")


def load_pretrain_config(config: str | None, overrides: Sequence[str], max_steps: int | None = None,
                         videos: Sequence[str] = (), init: str | None = None,
                         frames: str | None = None) -> VideoPretrainConfig:
    """Defaults <- ``config`` <- ``--set`` overrides <- ``--max-steps`` / ``--init`` / ``--frames`` <- ``--video``."""
    ov = list(overrides or [])
    if max_steps is not None:
        ov.append(f"trainer.max_steps={int(max_steps)}")
    if init is not None:
        ov.append(f"model.init={_yaml_str(init)}")
    if frames is not None:
        ov.append(f"data.frames={_yaml_str(frames)}")
    cfg = load_config(VideoPretrainConfig, config, ov)  # validated, cross-section checks included
    if videos:
        cfg.videos = [str(v) for v in videos]
    return cfg


def _yaml_str(text: str) -> str:
    """``text`` as a YAML string scalar (a path such as ``1e3`` or ``yes`` stays a string)."""
    import json

    return json.dumps(str(text))


def synth_videos(cfg: VideoPretrainConfig, run_dir: Path, progress: bool = True,
                 why: str = "no --video given") -> list[str]:
    """The synthetic walking tour of ``data.synth`` in ``<run>/data/synth`` (reused when it matches); ``why``
    starts the line that says it is written."""
    from wtours.video.synth import synthesize

    s = cfg.data.synth
    out = run_dir / "data" / "synth"
    want = {"width": s.width, "height": s.height, "fps": s.fps, "seconds": s.seconds, "seed": s.seed,
            "sequences": s.sequences, "seq_frames": s.seq_frames}
    meta = out / "synth.json"
    def ready() -> bool:
        if not (meta.is_file() and (out / "tour.mp4").is_file()):
            return False
        try:
            have = json.loads(meta.read_text())["params"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return all(have.get(k) == v for k, v in want.items())

    if ready() or wait_for_local_rank_zero(ready, "the synthetic video", out, timeout_s=600):
        return [str(out / "tour.mp4")]
    if progress:
        print(f"{why}: writing a synthetic walking tour to {out}", file=sys.stderr)
    res = synthesize(out_dir=out, width=s.width, height=s.height, fps=s.fps, seconds=s.seconds, seed=s.seed,
                     sequences=s.sequences, seq_frames=s.seq_frames, progress=progress)
    return [str(res.video)]


def crop_detail_warning(cfg: VideoPretrainConfig, videos: Sequence[str] = ()) -> str | None:
    """One line when the recipe's smallest crops get less source detail than in the DoRA reference at this
    ``data.short_side`` (or from a video smaller than it, which the decoder enlarges), else None.

    A warning, not an error: training below the reference's detail is a legitimate trade (CPU demos, quick
    ablations, sources that are only that large); the recipe preset itself is kept clear of it by a test."""
    from wtours.stages.video.config import detail_problem, min_short_side
    from wtours.video.decode import clip_size

    d = cfg.data
    out_h, out_w = clip_size(d.short_side, d.aspect)
    h, w, where = float(out_h), float(out_w), f"data.short_side {d.short_side}"
    if not d.frames:
        from wtours.video.index import index_video

        for v in videos:
            idx = index_video(v)
            f = max(out_h / idx.height, out_w / idx.width)  # the decoder's scale factor (> 1: enlarged)
            if f > 1 and out_h / f < h:
                h, w = out_h / f, out_w / f
                where = f"{v} ({idx.width}x{idx.height}, enlarged to data.short_side {d.short_side})"
    problem = detail_problem(cfg.crops, h, w, where)
    if problem is None:
        return None
    need = min_short_side(cfg.crops, d.aspect)
    return (f"{problem}; use data.short_side >= {need} with a source at least that large (wtours prepare "
            f"--short-side {need} makes one)")


def divergence_hint(cfg: VideoPretrainConfig) -> str:
    o = cfg.optim
    hint = f"lower optim.lr (now {o.lr:g})"
    if o.clip_grad == 0:
        return hint + " and keep gradient clipping on (optim.clip_grad, now 0; default 3.0)"
    return hint + f" or optim.clip_grad (now {o.clip_grad:g})"


class VideoStage(Stage):
    """Stage 1 as hooks on :func:`wtours.train.engine.run_stage`."""

    command, subdir, config_file = "pretrain", "stage1", "config.yaml"

    def __init__(self, cfg: VideoPretrainConfig) -> None:
        from wtours.train.checkpointing import CHECKPOINT_LAYOUT

        super().__init__(cfg)
        self.checkpoint_layout = CHECKPOINT_LAYOUT

    def config_hash(self) -> str:
        return training_hash(self.cfg)

    def training_view(self, config: dict[str, Any]) -> dict[str, Any]:
        return training_view(config)

    def divergence_hint(self) -> str:
        return divergence_hint(self.cfg)

    def prepare(self, run: StageRun) -> None:
        import torch

        from wtours.stages.video.data import make_clip_dataset
        from wtours.stages.video.schedules import resolve_clips_per_epoch

        cfg = self.cfg
        run_dir = ensure_dir(run.run_dir)
        synthetic = False
        if cfg.data.frames:
            if cfg.videos:
                raise UserError("give either --video files or --frames (data.frames), not both")
            if not Path(cfg.data.frames).is_dir():
                raise UserError("frame folder not found" if not Path(cfg.data.frames).exists() else "not a folder",
                                path=cfg.data.frames)
        elif not cfg.videos:
            cfg.videos = synth_videos(cfg, run_dir, progress=run.show)
            synthetic = True
        for v in cfg.videos:
            if not Path(v).is_file():
                from wtours.video.index import missing_reason

                raise UserError(missing_reason(v, "video not found") if not Path(v).exists() else "not a file", path=v)
        # data.clips_per_epoch: frames -> the number (indexes the videos, cached), before the config is hashed, so
        # the schedules, config.yaml, the checkpoint and the resume check all hold the resolved number
        per_epoch_given = cfg.data.clips_per_epoch
        resolve_clips_per_epoch(cfg, cfg.videos)
        if per_epoch_given != cfg.data.clips_per_epoch:
            run.notes.append(f"data.clips_per_epoch: {per_epoch_given} -> {cfg.data.clips_per_epoch} (one clip per "
                             "frame that can start a clip, as the DoRA reference's epoch)")
        detail = crop_detail_warning(cfg, cfg.videos)
        if detail:
            run.notes.append(f"warning: {detail}")
        decoded = list(cfg.videos)
        if not cfg.data.frames and not synthetic:  # data.proxy: auto: a 4K source is decoded from a cached proxy
            from wtours.video.prepare import training_videos

            decoded = training_videos(cfg.videos, cfg.data.short_side, cfg.data.proxy,
                                      progress=run.main_process and run.show)
        self.dataset = make_clip_dataset(cfg, decoded)  # indexes the videos; too-short ones fail here
        if cfg.model.init:  # read (verified) now: a bad --init fails before --fresh touches the old run
            from wtours.models.weights import load_backbone

            with torch.random.fork_rng(devices=[]):
                load_backbone(cfg.model.init, arch=cfg.model.arch)

    def build(self, run: StageRun) -> Built:
        from wtours.stages.video.callbacks import MaskPictures
        from wtours.stages.video.data import DataEpochCallback, VideoDataModule
        from wtours.stages.video.module import VideoModule
        from wtours.stages.video.schedules import clips_per_step
        from wtours.train.callbacks import CollapseWarning

        cfg = self.cfg
        module = VideoModule(cfg)
        self.sched = module.ensure_schedules(run.world)
        dm = VideoDataModule(cfg, self.dataset, run.world)
        self.pictures = MaskPictures(run.stage_dir / "pictures", cfg.log.picture_every)
        self.collapse = CollapseWarning(cfg.model.out_dim, cfg.trainer.log_every, run.run_dir / "report.md")
        return Built(module, dm, self.sched.total_steps, clips_per_step(cfg, run.world), cfg.data.frames_per_clip,
                     [self.pictures, DataEpochCallback(dm), self.collapse])

    def announce(self, run: StageRun, trainer: Any, built: Built) -> None:
        cfg, sched, world = self.cfg, self.sched, run.world
        if run.main_process and world > 1 and not run.on_gpu:
            print(f"pretrain: running {world} CPU processes (DDP, gloo); the learning rate scales with the {world}x "
                  f"larger total batch: peak lr {sched.peak_lr:.3g} (optim.lr {cfg.optim.lr:g} x "
                  f"{built.per_step} clips/step / optim.lr_batch_reference {cfg.optim.lr_batch_reference})",
                  file=sys.stderr)
        if run.show:
            for note in run.notes:
                print(f"pretrain: {note}", file=sys.stderr)
            print(f"pretrain: {cfg.model.arch}, {sched.total_steps} steps ({sched.steps_per_epoch}/epoch), "
                  f"{built.per_step} clips/step x {cfg.data.frames_per_clip} frames {run.ranks()}, peak lr "
                  f"{sched.peak_lr:.3g}, {run.precision_and_resume(trainer)}", file=sys.stderr)

    def export(self, run: StageRun, trainer: Any, built: Built) -> tuple[Any, str, dict[str, Any]]:
        cfg, step = self.cfg, trainer.global_step
        meta = {"stage": "+".join(cfg.objective.enabled()), "objectives": cfg.objective.enabled(),
                "steps": step, "config_hash": self.config_hash(), "init": cfg.model.init,
                "videos": [str(v) for v in cfg.videos], "frames": cfg.data.frames, "arch": cfg.model.arch,
                "clips_seen": step * built.per_step, "planned_steps": built.total_steps,
                "stopped_by_time": 0 < step < built.total_steps}
        return built.module.teacher.vit, cfg.model.arch, meta

    def summary(self, run: StageRun, trainer: Any, built: Built, rank_zero: bool) -> dict[str, Any]:
        if not rank_zero:
            return {}
        return {"pictures": [str(p) for p in self.pictures.written],
                "collapse_warnings": list(self.collapse.warnings)}


def run_pretrain(cfg: VideoPretrainConfig, run_dir: str | Path, resume: str | None = None,
                 devices: Any = None, num_nodes: int | None = None, extra_callbacks: Sequence[Any] = (),
                 progress: bool | None = None, fresh: bool = False, trust: bool = False,
                 max_seconds: float | None = None) -> dict[str, Any]:
    """Run stage 1 into ``run_dir`` (see the module docstring) -> a summary dict (:func:`run_stage`).

    ``fresh`` sets an existing ``stage1/`` aside first; ``trust`` reads a ``resume`` checkpoint that
    needs pickle. ``extra_callbacks`` are added to the Trainer (tests use one to simulate a kill).
    ``max_seconds`` caps this invocation's training time: a run stopped by it ends like a finished one
    (checkpoint, guard, export) with ``summary["stopped_by_time"]`` set and ``meta["planned_steps"]`` in
    ``backbone.pt``; the schedules keep their planned length.
    """
    return run_stage(VideoStage(cfg), run_dir, resume=resume, devices=devices, num_nodes=num_nodes,
                     extra_callbacks=extra_callbacks, progress=progress, fresh=fresh, trust=trust,
                     max_seconds=max_seconds)

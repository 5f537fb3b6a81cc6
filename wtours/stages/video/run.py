"""``wtours pretrain``: stage 1, DoRA video pretraining of a ViT from scratch.

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

import datetime
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from wtours.config import load_config, to_dict, to_yaml
from wtours.errors import UserError
from wtours.fsutil import ensure_dir, remove_stale_temps, write_text
from wtours.train.stage_run import (auto_resume, check_run_options, drop_set_aside,  # noqa: F401 (public here too)
                                    fresh_start, launch_rank_zero, loss_endpoints, print_loss_line, set_stage_aside)
from wtours.stages.video.config import VideoPretrainConfig, training_hash

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

    if ready():
        return [str(out / "tour.mp4")]
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) or 0)
    if local_rank > 0:  # torchrun / srun start all ranks at once: local rank 0 writes, the others wait
        import time

        for _ in range(1200):
            if ready():
                return [str(out / "tour.mp4")]
            time.sleep(0.5)
        raise UserError("timed out waiting for local rank 0 to write the synthetic video", path=out)
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


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    if resume is None:
        return None
    p = run_dir / "stage1" / "last.ckpt" if resume == "last" else Path(resume)
    if not p.is_file():
        raise UserError("checkpoint to resume from not found" + (" (no earlier run in --out)" if resume == "last" else ""),
                        path=p)
    return p


def run_pretrain(cfg: VideoPretrainConfig, run_dir: str | Path, resume: str | None = None,
                 devices: Any = None, num_nodes: int | None = None, extra_callbacks: Sequence[Any] = (),
                 progress: bool | None = None, fresh: bool = False, trust: bool = False,
                 max_seconds: float | None = None) -> dict[str, Any]:
    """Run stage 1 into ``run_dir`` (see the module docstring). Returns a summary dict.

    ``fresh`` sets an existing ``stage1/`` aside first; ``trust`` reads a ``resume`` checkpoint that
    needs pickle. ``extra_callbacks`` are added to the Trainer (tests use one to simulate a kill).
    ``max_seconds`` caps this invocation's training time (Lightning's ``max_time``): a run stopped by it
    ends like a finished one (checkpoint, guard, export) with ``summary["stopped_by_time"]`` set and
    ``meta["planned_steps"]`` in ``backbone.pt``; the schedules keep their planned length.
    """
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from wtours.models.backbone_io import export_backbone
    from wtours.train.callbacks import CollapseWarning, MaskPictures, StepProgressBar, ThroughputMonitor
    from wtours.train.checkpointing import AtomicCheckpointIO, check_config, read_checkpoint_meta
    from wtours.train.csv_logger import ResumableCSVLogger
    from wtours.train.guard import FiniteGuard
    from wtours.train.schedules import clips_per_step, resolve_clips_per_epoch
    from wtours.train.trainer_setup import (make_trainer, parse_devices, quiet_lightning, resolve_accelerator,
                                            step_options, world_size)
    from wtours.stages.video.data import DataEpochCallback, VideoDataModule, make_clip_dataset
    from wtours.stages.video.module import DoRAModule

    check_run_options(cfg, resume, fresh, num_nodes)
    dev = parse_devices(devices if devices is not None else cfg.trainer.devices)
    main_process = launch_rank_zero()
    # the checkpoint to resume from is read (verified, weights_only) before anything is written
    ckpt_path = resolve_resume(resume, Path(run_dir))
    resumed = read_checkpoint_meta(ckpt_path, trust) if ckpt_path is not None else None
    resumed_step = resumed["global_step"] if resumed is not None else None
    if resumed is not None and not resumed["verified"] and main_process:
        print(f"wtours pretrain: {ckpt_path} carries no checksum (written by an older wtours): not verified",
              file=sys.stderr)
    run_dir = ensure_dir(run_dir)
    show = cfg.log.progress if progress is None else progress
    synthetic = False
    if cfg.data.frames:
        if cfg.videos:
            raise UserError("give either --video files or --frames (data.frames), not both")
        if not Path(cfg.data.frames).is_dir():
            raise UserError("frame folder not found" if not Path(cfg.data.frames).exists() else "not a folder",
                            path=cfg.data.frames)
    elif not cfg.videos:
        cfg.videos = synth_videos(cfg, run_dir, progress=show)
        synthetic = True
    for v in cfg.videos:
        if not Path(v).is_file():
            from wtours.video.index import missing_reason

            raise UserError(missing_reason(v, "video not found") if not Path(v).exists() else "not a file", path=v)
    # data.clips_per_epoch: frames -> the number (indexes the videos, cached), before the config is hashed, so
    # the schedules, config.yaml, the checkpoint and the resume check all hold the resolved number
    per_epoch_given = cfg.data.clips_per_epoch
    resolve_clips_per_epoch(cfg, cfg.videos)
    notes = []
    if per_epoch_given != cfg.data.clips_per_epoch:
        notes.append(f"data.clips_per_epoch: {per_epoch_given} -> {cfg.data.clips_per_epoch} (one clip per frame "
                     "that can start a clip, as the DoRA reference's epoch)")
    detail = crop_detail_warning(cfg, cfg.videos)
    if detail:
        notes.append(f"warning: {detail}")
    cfg_hash = training_hash(cfg)
    if resumed is not None:
        check_config(resumed, cfg_hash, to_dict(cfg), ckpt_path)
    decoded = list(cfg.videos)
    if not cfg.data.frames and not synthetic:  # data.proxy: auto: a 4K source is decoded from a cached proxy
        from wtours.video.prepare import training_videos

        decoded = training_videos(cfg.videos, cfg.data.short_side, cfg.data.proxy, progress=main_process and show)
    dataset = make_clip_dataset(cfg, decoded)  # indexes the videos; too-short ones fail here
    if cfg.model.init:  # read (verified) now: a bad --init fails before --fresh touches the old run
        from wtours.models.backbone_io import load_backbone

        with torch.random.fork_rng(devices=[]):
            load_backbone(cfg.model.init, arch=cfg.model.arch)
    # every input is checked: only now may --fresh set the old stage1/ aside
    if fresh and main_process:
        fresh_start(run_dir / "stage1", "wtours pretrain")
    stage = ensure_dir(run_dir / "stage1")
    if main_process:
        n_tmp, size = remove_stale_temps(stage)
        if n_tmp:
            print(f"wtours pretrain: removed {n_tmp} temp file(s) ({size / 2**20:.1f} MiB) left by killed writes "
                  f"in {stage}", file=sys.stderr)
    write_text(run_dir / "config.yaml", "".join(f"# {n}\n" for n in notes) + to_yaml(cfg))
    accelerator, on_gpu = resolve_accelerator(cfg)
    if not on_gpu and cfg.trainer.cpu_threads > 0:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    nodes = num_nodes or cfg.trainer.num_nodes
    # the world size decides the schedules' length, which is the Trainer's max_steps
    world = world_size(accelerator, dev, nodes)
    module = DoRAModule(cfg)
    sched = module.ensure_schedules(world)
    loggers: list[Any] = [ResumableCSVLogger(run_dir, "stage1", keep_until_step=resumed_step)]
    if cfg.log.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="stage1", version="tb",
                                         default_hp_metric=False))
    # save_top_k=0 + save_last: only stage1/last.ckpt, overwritten (and no "directory not empty" warning)
    ckpt_cb = ModelCheckpoint(dirpath=str(stage), every_n_train_steps=cfg.trainer.checkpoint_every, save_top_k=0,
                              save_last=True, enable_version_counter=False, save_on_train_epoch_end=False)
    bar = StepProgressBar(refresh=cfg.trainer.log_every, enabled=show)
    pictures = MaskPictures(stage / "pictures", cfg.log.picture_every)
    throughput = ThroughputMonitor(clips_per_step(cfg, world), cfg.data.frames_per_clip, cfg.trainer.log_every)
    dm = VideoDataModule(cfg, dataset, world)
    data_epochs = DataEpochCallback(dm)
    guard = FiniteGuard(cfg.trainer.log_every, divergence_hint(cfg), stage / "last.ckpt",
                        saved_step=resumed_step if ckpt_path == stage / "last.ckpt" else None)

    def saved(path: Path, step: int) -> None:
        guard.saved(step)
        drop_set_aside(stage)  # a --fresh start is now safe: the new run has a checkpoint

    collapse = CollapseWarning(cfg.model.out_dim, cfg.trainer.log_every, run_dir / "report.md")
    callbacks = [bar, throughput, pictures, data_epochs, collapse, guard, ckpt_cb, *extra_callbacks]

    with warnings.catch_warnings():
        quiet_lightning()
        trainer = make_trainer(
            world, accelerator=accelerator, devices=dev, num_nodes=nodes, **step_options(cfg, on_gpu),
            max_epochs=-1, max_steps=sched.total_steps, callbacks=callbacks, log_every_n_steps=cfg.trainer.log_every,
            max_time=None if max_seconds is None else datetime.timedelta(seconds=float(max_seconds)),
            logger=loggers, plugins=[AtomicCheckpointIO(trust=trust, on_saved=saved)], limit_val_batches=0,
            num_sanity_val_steps=0, enable_model_summary=False, default_root_dir=str(run_dir))

    if trainer.is_global_zero and main_process and world > 1 and not on_gpu:
        print(f"pretrain: running {world} CPU processes (DDP, gloo); the learning rate scales with the {world}x "
              f"larger total batch: peak lr {sched.peak_lr:.3g} (optim.lr {cfg.optim.lr:g} x "
              f"{clips_per_step(cfg, world)} clips/step / optim.lr_batch_reference {cfg.optim.lr_batch_reference})",
              file=sys.stderr)
    if trainer.is_global_zero and show:
        for note in notes:
            print(f"pretrain: {note}", file=sys.stderr)
        print(f"pretrain: {cfg.model.arch}, {sched.total_steps} steps ({sched.steps_per_epoch}/epoch), "
              f"{clips_per_step(cfg, world)} clips/step x {cfg.data.frames_per_clip} frames on {world} "
              f"{'GPU' if on_gpu else 'CPU'} rank(s), peak lr {sched.peak_lr:.3g}, precision "
              f"{trainer.precision}" + (f"; resuming at step {resumed_step}" if resumed_step is not None else ""),
              file=sys.stderr)
    with warnings.catch_warnings():
        quiet_lightning()
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None)
        except SystemExit as e:  # Lightning's graceful Ctrl-C ends in sys.exit(1)
            if trainer.interrupted:
                raise KeyboardInterrupt from e
            raise
    stopped_by_time = max_seconds is not None and 0 < trainer.global_step < sched.total_steps
    if trainer.interrupted or (trainer.global_step < sched.total_steps and not stopped_by_time):
        raise KeyboardInterrupt
    summary: dict[str, Any] = {"steps": trainer.global_step, "run_dir": str(run_dir),
                               "stopped_by_time": stopped_by_time, "planned_steps": sched.total_steps}
    trainer.save_checkpoint(str(stage / "last.ckpt"))  # the guard checks the weights first
    guard.check(trainer, module)
    if trainer.is_global_zero:
        meta = {"stage": "+".join(cfg.objective.enabled()), "objectives": cfg.objective.enabled(),
                "steps": trainer.global_step, "config_hash": cfg_hash, "init": cfg.model.init,
                "videos": [str(v) for v in cfg.videos], "frames": cfg.data.frames, "arch": cfg.model.arch,
                "clips_seen": trainer.global_step * clips_per_step(cfg, world), "planned_steps": sched.total_steps,
                "stopped_by_time": stopped_by_time}
        export_backbone(module.teacher.vit, cfg.model.arch, stage / "backbone.pt", meta)
        summary["backbone"] = str(stage / "backbone.pt")
        for lg in loggers:
            lg.save()
        first, last = loss_endpoints(stage / "metrics.csv")
        summary.update(first_loss=first, last_loss=last, pictures=[str(p) for p in pictures.written],
                       collapse_warnings=list(collapse.warnings))
        from wtours.report import write_report

        summary["report"] = str(write_report(run_dir))
    return summary


def cli_main(args: Any) -> int:
    from wtours.pipeline.run import pipeline_mode

    if pipeline_mode(args):  # no stage-1-only option (--config, --init, --frames, --resume): the whole chain
        from wtours.pipeline.run import cli_main as pipeline_main

        return pipeline_main(args)
    cfg = load_pretrain_config(args.config, args.overrides, args.max_steps, args.video,
                               init=getattr(args, "init", None), frames=getattr(args, "frames", None))
    run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    import torch

    # auto-resume (as DINOv2 and solo-learn do): re-running a command continues its run, and a finished
    # run only re-exports; --fresh starts over
    resume, fresh = auto_resume(args, run_dir / "stage1" / "last.ckpt",
                                f"wtours pretrain: {run_dir} holds a run: continuing it (--fresh starts over)")
    try:
        summary = run_pretrain(cfg, run_dir, resume=resume, devices=args.devices, num_nodes=args.num_nodes,
                               fresh=fresh, trust=getattr(args, "trust_checkpoint", False))
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"CUDA out of memory (data.batch_size={cfg.data.batch_size}, crops.local_number="
                        f"{cfg.crops.local_number}, tracking.objects={cfg.tracking.objects}, model.arch="
                        f"{cfg.model.arch}): {OOM_HINT}") from None
    except KeyboardInterrupt:
        last = run_dir / "stage1" / "last.ckpt"
        hint = f"; continue with --resume (checkpoint: {last})" if last.is_file() else ""
        print(f"wtours pretrain: stopped before the end{hint}", file=sys.stderr)
        raise
    print_loss_line(summary, run_dir / "stage1" / "metrics.csv")
    if summary.get("backbone"):
        print(f"backbone: {summary['backbone']}")
        print(f"report: {summary['report']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from wtours.cli import main

    sys.exit(main(["pretrain", *sys.argv[1:]]))

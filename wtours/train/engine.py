"""The stage engine: the one skeleton every training stage runs (``wtours pretrain`` stage 1, ``wtours neco``).

:func:`run_stage` does, in this order::

    options     check_run_options, devices, which process prepares the run
    resume      the checkpoint to resume from is read (verified, weights_only) before anything is written
    inputs      Stage.prepare: every input the stage reads (videos, frames, images, --init) is checked
    resume      the checkpoint's config hash against this config (names the keys that differ)
    --fresh     only now the old <stage>/ is set aside; temp files of killed writes are removed
    data        Stage.data: what needs the stage directory (a frame cache), written config
    module      Stage.build(world): the LightningModule, the datamodule, the run length
    Trainer     make_trainer (world size checked), loggers (CSV + TensorBoard), last.ckpt every N steps
                (atomic, sealed), progress bar, throughput, pictures, finite guard, the stage's callbacks
    fit         under quiet_lightning (warnings ignored by category and emitting module)
    export      a final checkpoint, the guard's weight check, backbone.pt (rank 0), the run's report

A stage is a :class:`Stage` subclass: its hooks are the only places where the stages differ.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from wtours.config import to_yaml
from wtours.errors import UserError
from wtours.fsutil import ensure_dir, remove_stale_temps, write_text
from wtours.train.stage_run import check_run_options, drop_set_aside, fresh_start, launch_rank_zero, loss_endpoints


def local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``, SLURM's ``SLURM_LOCALID``; 0 without)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) or 0)


def wait_for_local_rank_zero(ready: Callable[[], bool], what: str, path: Path, timeout_s: float = 600.0) -> bool:
    """On a rank > 0 of a node (torchrun / srun start all ranks at once): wait until ``ready()`` (local rank 0
    writes ``what``) -> True; on local rank 0 -> False at once (it is the one that writes)."""
    if local_rank() == 0:
        return False
    for _ in range(max(1, int(timeout_s / 0.5))):
        if ready():
            return True
        time.sleep(0.5)
    raise UserError(f"timed out waiting for local rank 0 to write {what}", path=path)


@dataclass
class StageRun:
    """What :func:`run_stage` knows about the run in progress (the hooks read and fill it)."""

    cfg: Any
    run_dir: Path
    stage_dir: Path
    show: bool
    main_process: bool
    trust: bool
    resume_path: Path | None = None
    resumed: dict[str, Any] | None = None  # the checkpoint's ``wtours`` block (+ global_step, verified)
    fresh: bool = False
    notes: list[str] = field(default_factory=list)  # printed at start, written atop the config file
    on_gpu: bool = False
    world: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # the stage's own values between hooks

    @property
    def resumed_step(self) -> int | None:
        return self.resumed["global_step"] if self.resumed is not None else None

    def ranks(self) -> str:
        """``on 2 GPU rank(s)`` (the stages' start-up line)."""
        return f"on {self.world} {'GPU' if self.on_gpu else 'CPU'} rank(s)"

    def precision_and_resume(self, trainer: Any) -> str:
        """``precision bf16-mixed; resuming at step 40`` (the end of the stages' start-up line)."""
        return f"precision {trainer.precision}" + (f"; resuming at step {self.resumed_step}" if self.resumed else "")


@dataclass
class Built:
    """What :meth:`Stage.build` returns."""

    module: Any
    datamodule: Any
    total_steps: int
    per_step: int  # clips (stage 1) or images (NeCo) per optimizer step, over all ranks
    frames_per_item: int  # frames per clip, crops per image (the throughput monitor's second unit)
    callbacks: list[Any] = field(default_factory=list)  # the stage's own (pictures, data epochs, ...)


class Stage:
    """A training stage as hooks on :func:`run_stage` (see the module docstring for when each is called)."""

    command = "pretrain"  # ``wtours <command>``: message prefix, the checkpoint kind in errors
    subdir = "stage1"  # the stage's folder in the run directory
    config_file = "config.yaml"  # the resolved config, in the run directory
    checkpoint_stage: str | None = None  # ``checkpoint["wtours"]["stage"]`` the stage's checkpoints carry
    checkpoint_layout: int | None = None  # ``checkpoint["wtours"]["layout"]`` they must have (None: not checked)
    trainer_options: dict[str, Any] = {}

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def check_options(self, on_gpu: bool) -> None:
        """Stage-specific option checks (before anything is read)."""

    def prepare(self, run: StageRun) -> None:
        """Read and check every input before ``--fresh`` touches the old run (may write caches beside it)."""

    def config_hash(self) -> str:
        raise NotImplementedError

    def training_view(self, config: dict[str, Any]) -> dict[str, Any]:
        """The keys of a config dict that decide :meth:`config_hash` (names what differs on resume)."""
        return config

    def data(self, run: StageRun) -> None:
        """After ``--fresh``: what needs the stage directory (NeCo's frame cache)."""

    def build(self, run: StageRun) -> Built:
        raise NotImplementedError

    def divergence_hint(self) -> str:
        return "lower the learning rate"

    def announce(self, run: StageRun, trainer: Any, built: Built) -> None:
        """The stage's start-up lines (stderr), on global rank 0."""

    def export(self, run: StageRun, trainer: Any, built: Built) -> tuple[Any, str, dict[str, Any]]:
        """``(vit, arch, meta)`` of the exported backbone."""
        raise NotImplementedError

    def summary(self, run: StageRun, trainer: Any, built: Built, rank_zero: bool) -> dict[str, Any]:
        """The stage's own entries of the run's summary."""
        return {}


def resolve_resume(resume: str | None, stage_dir: Path) -> Path | None:
    """``--resume``: ``last`` (the stage's ``last.ckpt``) or a path -> the checkpoint (must exist)."""
    if resume is None:
        return None
    p = stage_dir / "last.ckpt" if resume == "last" else Path(resume)
    if not p.is_file():
        raise UserError("checkpoint to resume from not found" + (" (no earlier run in --out)" if resume == "last" else ""),
                        path=p)
    return p


def run_stage(stage: Stage, run_dir: str | Path, resume: str | None = None, devices: Any = None,
              num_nodes: int | None = None, extra_callbacks: Sequence[Any] = (), progress: bool | None = None,
              fresh: bool = False, trust: bool = False, max_seconds: float | None = None) -> dict[str, Any]:
    """Run ``stage`` into ``run_dir`` (see the module docstring) -> the run's summary dict.

    ``fresh`` sets an existing stage directory aside first; ``trust`` reads checkpoints that need pickle.
    ``extra_callbacks`` are added to the Trainer (tests use one to simulate a kill). ``max_seconds`` caps this
    invocation's training time (Lightning's ``max_time``): a run stopped by it ends like a finished one
    (checkpoint, guard, export) with ``summary["stopped_by_time"]``; the schedules keep their planned length.
    """
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from wtours.models.weights import export_backbone
    from wtours.report import write_report
    from wtours.train.callbacks import StepProgressBar, ThroughputMonitor
    from wtours.train.checkpointing import AtomicCheckpointIO, check_config, read_checkpoint_meta
    from wtours.train.csv_logger import ResumableCSVLogger
    from wtours.train.guard import FiniteGuard
    from wtours.train.trainer_setup import (make_trainer, parse_devices, quiet_lightning, resolve_accelerator,
                                            step_options, world_size)

    cfg, prog = stage.cfg, f"wtours {stage.command}"
    check_run_options(cfg, resume, fresh, num_nodes)
    accelerator, on_gpu = resolve_accelerator(cfg)
    stage.check_options(on_gpu)
    dev = parse_devices(devices if devices is not None else cfg.trainer.devices)
    run_dir = Path(run_dir)
    run = StageRun(cfg=cfg, run_dir=run_dir, stage_dir=run_dir / stage.subdir, trust=trust, fresh=fresh,
                   show=cfg.log.progress if progress is None else progress, main_process=launch_rank_zero(),
                   on_gpu=on_gpu)
    # the checkpoint to resume from is read (verified, weights_only) before anything is written
    run.resume_path = resolve_resume(resume, run.stage_dir)
    if run.resume_path is not None:
        run.resumed = read_checkpoint_meta(run.resume_path, trust, stage.command, stage.checkpoint_stage)
        if not run.resumed["verified"] and run.main_process:
            print(f"{prog}: {run.resume_path} carries no checksum (written by an older wtours): not verified",
                  file=sys.stderr)
    stage.prepare(run)
    if run.resumed is not None:
        from wtours.config import to_dict

        check_config(run.resumed, stage.config_hash(), to_dict(cfg), run.resume_path, stage.training_view,
                     stage.checkpoint_layout)
    # every input is checked: only now may --fresh set the old stage directory aside
    ensure_dir(run_dir)
    if fresh and run.main_process:
        fresh_start(run.stage_dir, prog)
    stage_dir = ensure_dir(run.stage_dir)
    if run.main_process:
        n_tmp, size = remove_stale_temps(stage_dir)
        if n_tmp:
            print(f"{prog}: removed {n_tmp} temp file(s) ({size / 2**20:.1f} MiB) left by killed writes in "
                  f"{stage_dir}", file=sys.stderr)
    stage.data(run)
    write_text(run_dir / stage.config_file, "".join(f"# {n}\n" for n in run.notes) + to_yaml(cfg))
    if not on_gpu and cfg.trainer.cpu_threads > 0:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    nodes = num_nodes or cfg.trainer.num_nodes
    # the world size decides the schedules' length, which is the Trainer's max_steps
    run.world = world_size(accelerator, dev, nodes)
    built = stage.build(run)
    resumed_step = run.resumed_step
    loggers: list[Any] = [ResumableCSVLogger(run_dir, stage.subdir, keep_until_step=resumed_step)]
    if cfg.log.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name=stage.subdir, version="tb",
                                         default_hp_metric=False))
    # save_top_k=0 + save_last: only <stage>/last.ckpt, overwritten (and no "directory not empty" warning)
    ckpt_cb = ModelCheckpoint(dirpath=str(stage_dir), every_n_train_steps=cfg.trainer.checkpoint_every, save_top_k=0,
                              save_last=True, enable_version_counter=False, save_on_train_epoch_end=False)
    bar = StepProgressBar(refresh=cfg.trainer.log_every, enabled=run.show, label=stage.command)
    throughput = ThroughputMonitor(built.per_step, built.frames_per_item, cfg.trainer.log_every)
    last = stage_dir / "last.ckpt"
    guard = FiniteGuard(cfg.trainer.log_every, stage.divergence_hint(), last,
                        saved_step=resumed_step if run.resume_path == last else None)

    def saved(path: Path, step: int) -> None:
        guard.saved(step)
        drop_set_aside(stage_dir)  # a --fresh start is now safe: the new run has a checkpoint

    callbacks = [bar, throughput, *built.callbacks, guard, ckpt_cb, *extra_callbacks]
    with warnings.catch_warnings():
        quiet_lightning()
        trainer = make_trainer(
            run.world, accelerator=accelerator, devices=dev, num_nodes=nodes, **step_options(cfg, on_gpu),
            max_epochs=-1, max_steps=built.total_steps, callbacks=callbacks, log_every_n_steps=cfg.trainer.log_every,
            max_time=None if max_seconds is None else datetime.timedelta(seconds=float(max_seconds)),
            logger=loggers, plugins=[AtomicCheckpointIO(trust=trust, on_saved=saved)], limit_val_batches=0,
            num_sanity_val_steps=0, enable_model_summary=False, default_root_dir=str(run_dir),
            **stage.trainer_options)
    if trainer.is_global_zero:
        stage.announce(run, trainer, built)
    with warnings.catch_warnings():
        quiet_lightning()
        try:
            trainer.fit(built.module, datamodule=built.datamodule,
                        ckpt_path=str(run.resume_path) if run.resume_path else None)
        except SystemExit as e:  # Lightning's graceful Ctrl-C ends in sys.exit(1)
            if trainer.interrupted:
                raise KeyboardInterrupt from e
            raise
    total = built.total_steps
    stopped_by_time = max_seconds is not None and 0 < trainer.global_step < total
    if trainer.interrupted or (trainer.global_step < total and not stopped_by_time):
        raise KeyboardInterrupt
    summary: dict[str, Any] = {"steps": trainer.global_step, "run_dir": str(run_dir),
                               "stopped_by_time": stopped_by_time, "planned_steps": total}
    trainer.save_checkpoint(str(last))  # the guard checks the weights first
    guard.check(trainer, built.module)
    if trainer.is_global_zero:
        vit, arch, meta = stage.export(run, trainer, built)
        export_backbone(vit, arch, stage_dir / "backbone.pt", meta)
        summary["backbone"] = str(stage_dir / "backbone.pt")
        for lg in loggers:
            lg.save()
        first, last_loss = loss_endpoints(stage_dir / "metrics.csv")
        summary.update(first_loss=first, last_loss=last_loss)
    summary.update(stage.summary(run, trainer, built, trainer.is_global_zero))
    if trainer.is_global_zero:
        summary["report"] = str(write_report(run_dir))
    return summary

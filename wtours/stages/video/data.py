"""Stage-1 data: a LightningDataModule over :class:`wtours.video.clips.ClipDataset`.

CPU workers only decode and resize, into a shared pool from which
:class:`~wtours.video.loader.ClipLoader` assembles batches of decoder pixels (I420 planes); the
DataModule's ``on_after_batch_transfer`` turns them into the uint8 RGB clips ``[B, T, 3, H, W]`` of
the training step on the device, and all augmentation runs batched there (:mod:`wtours.stages.video.augment`).
Frame folders (:class:`~wtours.video.frames.FrameFolderClips`) take the same path, one decode task per
batch. The dataset shards itself over ranks and
workers (Lightning injects no sampler into an ``IterableDataset``), every rank gets exactly
``batches_per_epoch`` full batches (so DDP never waits on a rank with fewer), and the position in
the clip stream is a function of ``trainer.global_step``:

    consumed micro-batches = global_step x accumulate_grad_batches
    data epoch             = consumed // batches_per_epoch
    first sample to load   = (consumed % batches_per_epoch) x batch_size      (per rank)

:meth:`VideoDataModule.train_dataloader` applies it when the loader is (re)built, which Lightning
does after restoring a checkpoint, and :class:`DataEpochCallback` moves to the next data epoch at
every epoch start. ``set_epoch``/``set_start`` live in shared memory, so persistent workers follow.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from wtours.stages.video.schedules import steps_per_epoch
from wtours.stages.video.config import VideoPretrainConfig
from wtours.video.loader import ClipLoader, loader_source, to_clip_chw


def make_clip_dataset(cfg: VideoPretrainConfig, videos: Sequence[str], world: int = 1) -> Any:
    """The run's clip dataset: :class:`~wtours.video.frames.FrameFolderClips` over ``data.frames`` when set
    (folders of JPEG frames), else :class:`~wtours.video.clips.ClipDataset` over ``videos`` (indexes them;
    a too-short video raises ``VideoError``). Both yield the same items."""
    from wtours.video.clips import ClipDataset

    d = cfg.data
    bpe = batches_per_epoch(cfg, world)
    if d.frames:
        from wtours.video.frames import FrameFolderClips

        return FrameFolderClips(d.frames, frames_per_clip=d.frames_per_clip, stride=max(1, int(round(d.stride))),
                                short_side=d.short_side, aspect=d.aspect, clips_per_epoch=bpe * d.batch_size * world,
                                seed=cfg.seed, sampling=d.sampling, batch_size=d.batch_size)
    return ClipDataset(list(videos), frames_per_clip=d.frames_per_clip, stride=d.stride, stride_unit=d.stride_unit,
                       short_side=d.short_side, aspect=d.aspect, clips_per_epoch=bpe * d.batch_size * world,
                       seed=cfg.seed, backend=d.backend, batch_size=d.batch_size, lanes=d.lanes)


def batches_per_epoch(cfg: VideoPretrainConfig, world: int) -> int:
    """Micro-batches per rank and epoch (a multiple of ``accumulate_grad_batches``)."""
    return steps_per_epoch(cfg, world) * cfg.trainer.accumulate_grad_batches


class VideoDataModule(pl.LightningDataModule):
    """Clips of the run's videos for ``world`` ranks (see the module docstring)."""

    def __init__(self, cfg: VideoPretrainConfig, dataset: Any, world: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.dataset = dataset
        self.world = world
        self.bpe = batches_per_epoch(cfg, world)
        self.dataset.clips_per_epoch = self.bpe * cfg.data.batch_size * world
        self.loader: ClipLoader | None = None

    def position(self, global_step: int) -> tuple[int, int]:
        """``(data epoch, first sample of this rank's epoch)`` after ``global_step`` optimizer steps."""
        consumed = int(global_step) * self.cfg.trainer.accumulate_grad_batches
        epoch, within = divmod(consumed, self.bpe)
        return epoch, within * self.cfg.data.batch_size

    def seek(self, global_step: int) -> None:
        epoch, start = self.position(global_step)
        self.dataset.set_epoch(epoch)
        self.dataset.set_start(start)

    def train_dataloader(self) -> ClipLoader:
        step = self.trainer.global_step if self.trainer is not None else 0
        self.seek(step)
        from wtours.video.clips import worker_context

        d = self.cfg.data
        workers = d.num_workers
        if self.loader is not None:
            self.loader.close()  # Lightning rebuilds the loader after a restore: stop the old workers
        self.loader = ClipLoader(loader_source(self.dataset), d.batch_size, num_workers=workers, drop_last=True,
                                 pin_memory=torch.cuda.is_available(), prefetch_factor=max(2, d.prefetch_factor),
                                 multiprocessing_context=worker_context(workers))
        return self.loader

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The loader ships decoder pixels (I420, or RGB channels-last); the step wants RGB ``[B, T, 3, H, W]``:
        made here, on the device."""
        return to_clip_chw(batch) if isinstance(batch, dict) else batch

    def teardown(self, stage: str) -> None:
        if self.loader is not None:
            self.loader.close()
            self.loader = None


class DataEpochCallback(Callback):
    """At each epoch start, point the dataset at the data epoch implied by ``global_step``."""

    def __init__(self, dm: VideoDataModule) -> None:
        self.dm = dm

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        epoch, _ = self.dm.position(trainer.global_step)
        if epoch != self.dm.dataset.epoch:
            self.dm.dataset.set_epoch(epoch)

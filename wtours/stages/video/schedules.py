"""Per-optimizer-step schedules of a DoRA run (DINO style): lr, weight decay, teacher momentum,
teacher temperature, plus the run length they are built for.

All are plain float64 tensors indexed by ``trainer.global_step`` (clamped to the last value), so
a resumed run picks up exactly where it stopped: nothing here has state of its own.

    s = build_schedules(cfg, steps_per_epoch=32, world_size=1)
    s.lr[step], s.wd[step], s.momentum[step], s.teacher_temp[step]
    s.at(step)          # -> StepValues(step, lr, wd, momentum, teacher_temp, freeze_last_layer)

The epoch: ``data.clips_per_epoch`` clips. ``clips_per_epoch: frames`` (the DoRA reference's epoch,
dora.md §1.2: every frame that can start a clip is a clip start, ~N clips per epoch of an N-frame
video) must be resolved to a number before anything here is built::

    resolve_clips_per_epoch(cfg, videos)      # indexes the videos (cached); cfg.data.clips_per_epoch = N

so that warm-up (10 epochs), the frozen last layer (1 epoch) and the cosine lengths (100 epochs) are
the reference's in steps for the same clips per step. ``wtours pretrain`` does it before hashing the
config, so the resolved number is what ``config.yaml``, the checkpoint's config and the resume check
hold (a resume whose videos resolve to another number is refused as another config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from typing import Sequence

from wtours.errors import ConfigError
from wtours.models.ema import cosine_schedule
from wtours.objectives.interface import StepValues
from wtours.stages.video.config import CLIPS_PER_EPOCH_FRAMES, VideoPretrainConfig


@dataclass
class Schedules:
    """Schedules of length ``total_steps`` (see the module docstring)."""

    total_steps: int
    steps_per_epoch: int
    peak_lr: float
    freeze_last_layer_steps: int
    lr: torch.Tensor
    wd: torch.Tensor
    momentum: torch.Tensor
    teacher_temp: torch.Tensor

    def at(self, step: int) -> StepValues:
        """The values at optimizer step ``step`` (clamped into the schedule; host floats, no device sync)."""
        i = min(max(int(step), 0), self.total_steps - 1)
        return StepValues(step=int(step), lr=float(self.lr[i]), wd=float(self.wd[i]),
                          momentum=float(self.momentum[i]), teacher_temp=float(self.teacher_temp[i]),
                          freeze_last_layer=int(step) < self.freeze_last_layer_steps)


def clips_per_step(cfg: VideoPretrainConfig, world_size: int) -> int:
    """Clips that make one optimizer step, over all ranks and accumulated micro-batches."""
    return cfg.data.batch_size * world_size * cfg.trainer.accumulate_grad_batches


def clip_starts(cfg: VideoPretrainConfig, videos: Sequence[str] = ()) -> int:
    """Clips of one reference epoch (``clips_per_epoch: frames``): every frame that can start a clip.

    Videos: ``sum(frames - span + 1)`` with ``span = (T - 1) * stride + 1`` frames per clip (the reference's
    ``len = N - F*S``, within one clip span); indexing is cached, so the run's dataset reuses it. Frame folders
    (``data.frames``): the number of frame files. A video too short for one clip counts 0 (the dataset then
    refuses it, naming it)."""
    d = cfg.data
    if d.frames:
        from wtours.video.frames import find_frame_videos

        _, found = find_frame_videos(d.frames)
        return sum(len(files) for files in found.values())
    from wtours.video.clips import clip_span_frames
    from wtours.video.index import index_video

    total = 0
    for v in videos:
        idx = index_video(v)
        total += max(0, idx.num_frames - clip_span_frames(idx, d.frames_per_clip, d.stride, d.stride_unit) + 1)
    return total


def resolve_clips_per_epoch(cfg: VideoPretrainConfig, videos: Sequence[str] = ()) -> int:
    """Replace ``data.clips_per_epoch: frames`` in ``cfg`` by :func:`clip_starts` (in place) -> clips per epoch.

    A number is left as it is. At least ``data.batch_size`` (a shorter epoch could not make one batch)."""
    d = cfg.data
    if d.clips_per_epoch == CLIPS_PER_EPOCH_FRAMES:
        d.clips_per_epoch = max(d.batch_size, clip_starts(cfg, videos))
    return int(d.clips_per_epoch)


def clips_per_epoch(cfg: VideoPretrainConfig) -> int:
    """``data.clips_per_epoch`` as a number; a one-line :class:`ConfigError` while it is still ``frames``."""
    n = cfg.data.clips_per_epoch
    if n == CLIPS_PER_EPOCH_FRAMES:
        raise ConfigError(f"data.clips_per_epoch: '{CLIPS_PER_EPOCH_FRAMES}' is resolved when the videos are indexed "
                          "(wtours.stages.video.schedules.resolve_clips_per_epoch) and was not resolved here")
    return int(n)


def steps_per_epoch(cfg: VideoPretrainConfig, world_size: int) -> int:
    """Optimizer steps per epoch (an epoch is ``data.clips_per_epoch`` clips, resolved; at least 1)."""
    return max(1, clips_per_epoch(cfg) // clips_per_step(cfg, world_size))


def teacher_temp_schedule(warmup: float, final: float, warmup_steps: int, total_steps: int) -> torch.Tensor:
    """Linear ``warmup -> final`` over ``warmup_steps``, then constant (DINO's teacher temperature)."""
    warmup_steps = min(warmup_steps, total_steps)
    return torch.cat([torch.linspace(warmup, final, warmup_steps, dtype=torch.float64),
                      torch.full((total_steps - warmup_steps,), final, dtype=torch.float64)])


def build_schedules(cfg: VideoPretrainConfig, steps_per_epoch_: int, world_size: int) -> Schedules:
    """Schedules for a run of ``trainer.max_steps`` steps (default ``epochs x steps_per_epoch``).

    ``peak lr = optim.lr x clips per step / optim.lr_batch_reference`` (clips, not frames).
    Warm-ups given in epochs are converted with ``steps_per_epoch_`` and capped by the run length.
    """
    o, t = cfg.optim, cfg.trainer
    total = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch_))
    peak = o.lr * clips_per_step(cfg, world_size) / o.lr_batch_reference
    warm = min(total, round(o.warmup_epochs * steps_per_epoch_))
    lr = cosine_schedule(peak, o.min_lr, total, warmup_steps=warm)
    wd = cosine_schedule(o.weight_decay, o.weight_decay_end, total)
    mom = cosine_schedule(o.momentum_teacher, 1.0, total)
    ttemp_warm = round(cfg.loss.warmup_teacher_temp_epochs * steps_per_epoch_)
    temp = teacher_temp_schedule(cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp, ttemp_warm, total)
    freeze = round(o.freeze_last_layer_epochs * steps_per_epoch_)
    return Schedules(total_steps=total, steps_per_epoch=steps_per_epoch_, peak_lr=peak,
                     freeze_last_layer_steps=freeze, lr=lr, wd=wd, momentum=mom, teacher_temp=temp)

"""Stage-2 (NeCo post-pretraining) config: a tree of dataclasses loaded by :mod:`wtours.config`.

Defaults follow NeCo's released ViT-S recipe (``shared/reference/neco.md`` §1-2): 2 global crops
(scale .25-1) + 4 local crops (scale .05-.25) per image with >= 1 % overlap (2 % between the
globals), projection head D -> 2048 -> 2048 -> 256, ROI-align 7 x 7, 8192-entry reference queues,
bitonic soft sort with steepness 100 for student and teacher, AdamW backbone lr 1e-5 / head lr
1e-4 (cosine to 0, no warm-up), weight decay cosine .04 -> .5, EMA cosine .9995 -> 1, 25 epochs
of batch 64. Presets: ``configs/neco/neco_vits16.yaml`` (GPU), ``configs/neco/tiny.yaml`` (CPU)::

    cfg = load_config(NeCoConfig, "configs/neco/tiny.yaml", ["loss.sorter=odd_even"])

The data source and the encoder come from the command line (``--init``, ``--images`` /
``--frames-from``) and are stored in the config (``init``, ``images``, ``frames_from``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from wtours.train.common_config import (TRAINING_TRAINER_KEYS, LogConfig, TrainerConfig, at_least, check_prob,
                                        check_range, hash_training_view, positive)


@dataclass
class NeCoDataConfig:
    """Image folder / frame cache and the CPU loader."""

    image_size: int = 448  # images: long side resized to this, edge-padded to a square canvas
    frames: int = 10000  # --frames-from: frames taken from the videos (spread over them by length)
    frame_sampling: Literal["even", "random"] = "even"
    frame_short_side: int = 360  # --frames-from: frames are decoded once at this short side into the cache
    batch_size: int = 64
    num_workers: int = 8
    prefetch_factor: int = 2

    def validate(self) -> None:
        at_least(self, 16, "image_size", "frame_short_side")
        at_least(self, 1, "frames", "batch_size", "prefetch_factor")
        at_least(self, 0, "num_workers")


@dataclass
class NeCoCropsConfig:
    """GPU multi-crop with NeCo's overlap constraint (:mod:`wtours.stages.neco.crops`); sizes in pixels,
    scales and overlaps as fractions of the image area."""

    global_number: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_number: int = 4
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.25)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    min_overlap: float = 0.01  # every local crop with every global crop
    min_overlap_globals: float = 0.02  # global crop 1 with global crop 0
    max_tries: int = 50  # candidates per crop before the fallback
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def validate(self) -> None:
        at_least(self, 1, "global_number", "max_tries")
        at_least(self, 0, "local_number")
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name}: must be >= 8 pixels, got {getattr(self, name)}")
        for name in ("global_scale", "local_scale"):
            check_range(name, getattr(self, name), 1e-4, 1.0)
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio: expected 0 < min <= max, got {list(self.ratio)}")
        for name in ("jitter_p", "grayscale_p", "blur_p"):
            check_prob(name, getattr(self, name))
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue: must lie in [0, 0.5], got {self.hue}")
        if self.blur_sigma[0] <= 0 or self.blur_sigma[0] > self.blur_sigma[1]:
            raise ValueError(f"blur_sigma: expected 0 < min <= max, got {list(self.blur_sigma)}")
        if not 0 <= self.min_overlap < 1 or not 0 <= self.min_overlap_globals < 1:
            raise ValueError("min_overlap and min_overlap_globals: fractions of the image area in [0, 1)")
        # an overlap larger than the smaller crop can ever be is impossible, whatever the tries
        if self.global_number > 1 and self.min_overlap_globals >= self.global_scale[1]:
            raise ValueError(f"min_overlap_globals: {self.min_overlap_globals:g} cannot be met: a global crop covers "
                             f"at most global_scale[1] = {self.global_scale[1]:g} of the image; lower it")
        if self.local_number > 0 and self.min_overlap >= min(self.local_scale[1], self.global_scale[1]):
            raise ValueError(f"min_overlap: {self.min_overlap:g} cannot be met: a local crop covers at most "
                             f"local_scale[1] = {self.local_scale[1]:g} of the image; lower it or raise local_scale")


@dataclass
class NeCoModelConfig:
    """Projection head (both nets) and stochastic depth (student); the backbone comes from ``--init``."""

    drop_path_rate: float = 0.1
    head_hidden_dim: int = 2048
    head_out_dim: int = 256
    head_layers: int = 3
    drop_registers: bool = True  # NeCo's headline model: DINOv2-reg weights in an arch without registers
    # copy: the teacher's head starts as the student's; independent: its own random init (the reference, neco.md §1.1)
    teacher_head: Literal["copy", "independent"] = "copy"
    # position embeddings at other input sizes (local crops): timm's antialiased resampling, or DINO's bicubic
    # with the +0.1 offset (the reference's "v1" DINO-family ViTs; wtours.models.vit)
    pos_interp: Literal["timm", "dino"] = "timm"

    def validate(self) -> None:
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"drop_path_rate: must lie in [0, 1), got {self.drop_path_rate}")
        at_least(self, 1, "head_hidden_dim", "head_out_dim", "head_layers")


@dataclass
class NeCoLossConfig:
    """Sorter, references and ROI alignment (:mod:`wtours.objectives.neco`)."""

    sorter: Literal["bitonic", "odd_even", "torchsort"] = "bitonic"
    impl: Literal["lean", "autograd", "naive"] = "lean"
    steepness_student: float = 100.0
    steepness_teacher: float = 100.0
    roi_size: int = 7
    references: Literal["queue", "batch"] = "queue"
    queue_length: int = 8192
    queue_push_per_image: int = 10
    torchsort_strength: float = 0.01
    log_eps: float = 1e-12
    chunk_rows: int = 8192  # impl=lean: rows sorted at a time (bounds the sorter's transient memory); 0 = all

    def validate(self) -> None:
        positive(self, "steepness_student", "steepness_teacher", "torchsort_strength", "log_eps")
        at_least(self, 2, "roi_size")
        at_least(self, 1, "queue_length", "queue_push_per_image")
        at_least(self, 0, "chunk_rows")
        if self.references == "queue" and self.queue_length < self.roi_size ** 2:
            raise ValueError(f"queue_length: {self.queue_length} < roi_size^2 = {self.roi_size ** 2} references")


@dataclass
class NeCoOptimConfig:
    """AdamW with per-step cosine schedules; two learning rates (backbone, head)."""

    lr_backbone: float = 1e-5
    lr_head: float = 1e-4
    final_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.5
    betas: tuple[float, float] = (0.9, 0.999)
    momentum_teacher: float = 0.9995
    momentum_teacher_end: float = 1.0
    clip_grad: float = 0.0  # global gradient-norm clipping; 0 = off (the reference does not clip)

    def validate(self) -> None:
        if self.lr_backbone < 0 or self.lr_head <= 0 or self.final_lr < 0:
            raise ValueError("lr_backbone must be >= 0, lr_head > 0 and final_lr >= 0")
        at_least(self, 0, "warmup_steps")
        for name in ("momentum_teacher", "momentum_teacher_end"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must lie in [0, 1], got {getattr(self, name)}")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad: must be >= 0 (0 turns clipping off), got {self.clip_grad}")


@dataclass
class NeCoTrainerConfig(TrainerConfig):
    """Run length, precision, devices, checkpoints (stage 1's, 25 epochs by default)."""

    epochs: float = 25


@dataclass
class NeCoLogConfig(LogConfig):
    """Pictures (PCA of the student's patch features on fixed images), progress bar, loggers."""

    picture_every: int = 1000


@dataclass
class NeCoConfig:
    """Everything ``wtours neco`` needs."""

    name: str = "neco"
    seed: int = 0
    init: str = ""  # --init: backbone.pt, timm ViT state dict, DINOv2 weights or random:<arch>
    images: str = ""  # --images: a folder of images (any depth)
    frames_from: list[str] = field(default_factory=list)  # --frames-from: videos to sample frames from
    export: Literal["student", "teacher"] = "student"  # NeCo evaluates the student backbone
    data: NeCoDataConfig = field(default_factory=NeCoDataConfig)
    crops: NeCoCropsConfig = field(default_factory=NeCoCropsConfig)
    model: NeCoModelConfig = field(default_factory=NeCoModelConfig)
    loss: NeCoLossConfig = field(default_factory=NeCoLossConfig)
    optim: NeCoOptimConfig = field(default_factory=NeCoOptimConfig)
    trainer: NeCoTrainerConfig = field(default_factory=NeCoTrainerConfig)
    log: NeCoLogConfig = field(default_factory=NeCoLogConfig)


def neco_training_view(d: dict) -> dict:
    """The part of a config dict that a resumed run must share with its checkpoint (everything but
    names, logging, devices, loader parallelism and checkpoint cadence)."""
    d = dict(d)
    for k in ("name", "log", "export"):
        d.pop(k, None)
    d["trainer"] = {k: v for k, v in d.get("trainer", {}).items() if k in TRAINING_TRAINER_KEYS}
    d["data"] = {k: v for k, v in d.get("data", {}).items() if k not in ("num_workers", "prefetch_factor")}
    if isinstance(d.get("model"), dict):  # keys added by issue 18, left out at their defaults: older runs still resume
        d["model"] = {k: v for k, v in d["model"].items() if (k, v) not in (("teacher_head", "copy"), ("pos_interp", "timm"))}
    return d


def neco_training_hash(cfg: NeCoConfig) -> str:
    """Hash of :func:`neco_training_view` (stored in checkpoints, compared on resume)."""
    from wtours.config import to_dict

    return hash_training_view(neco_training_view(to_dict(cfg)))

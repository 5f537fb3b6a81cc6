"""Stage-1 (DoRA video pretraining) config: a tree of dataclasses loaded by :mod:`wtours.config`.

Defaults follow the DoRA reference recipe (``shared/reference/dora.md`` §4): ViT-S/16 from
scratch, 65,536 prototypes, 1 global 224 + 6 local 112 crops per frame, 8 frames 60 apart,
k = 3 tracked objects, AdamW 5e-4 x clips/256, cosine schedules. Presets live in
``configs/video/`` (``dora_vits16.yaml`` for GPUs, ``tiny.yaml`` for a CPU demo)::

    cfg = load_config(VideoPretrainConfig, "configs/video/tiny.yaml", ["optim.lr=1e-3"])

Lengths are given in optimizer steps where a run is cut (``trainer.max_steps``) and in epochs
for the recipe's schedule shapes (warm-ups, frozen last layer); an epoch is
``data.clips_per_epoch`` clips, so ``steps_per_epoch = clips_per_epoch // (batch x world x accumulate)``.
``data.clips_per_epoch: frames`` is the reference's epoch (dora.md §1.2: every frame that can start a
clip starts one, ~N clips per epoch of an N-frame tour); it is resolved to that number when the run
indexes its videos (:func:`wtours.stages.video.schedules.resolve_clips_per_epoch`), and the resolved number
is what the schedules, the checkpoint and ``config.yaml`` hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional, Union

from wtours.train.common_config import (TRAINING_TRAINER_KEYS, LogConfig, TrainerConfig, at_least, check_prob,
                                        check_range, hash_training_view, positive)

#: ``data.clips_per_epoch`` value meaning "one clip per frame of the training videos" (the reference's epoch)
CLIPS_PER_EPOCH_FRAMES = "frames"


@dataclass
class SynthConfig:
    """The synthetic walking tour used when no ``--video`` is given."""

    width: int = 640
    height: int = 360
    fps: float = 30.0
    seconds: float = 10.0
    seed: int = 0
    # evaluation sets written beside the tour (davis/ and ytvos/ layouts, different scenes from the tour)
    sequences: int = 3
    seq_frames: int = 12

    def validate(self) -> None:
        at_least(self, 0, "sequences")
        at_least(self, 1, "seq_frames")


@dataclass
class DataConfig:
    """Clip sampling (``wtours.video.clips.ClipDataset``) and the CPU loader."""

    frames_per_clip: int = 8
    stride: float = 60
    stride_unit: Literal["frames", "seconds"] = "frames"
    short_side: int = 360
    aspect: float = 16 / 9
    # an integer, or "frames": one clip per valid clip start (frame) of the training videos, as the reference
    clips_per_epoch: Union[int, Literal["frames"]] = 8192
    batch_size: int = 16
    num_workers: int = 8
    backend: str = "pyav"
    prefetch_factor: int = 2
    # auto: decode a cached H.264 proxy at short_side (made once by `wtours prepare`) of any video whose short
    # side is >= 1.5x short_side; off: decode the videos as given
    proxy: Literal["auto", "off"] = "auto"
    # places of the tour a batch draws from (None: the batch size, at most 32); the loader's shared clip pool
    # holds about lanes x (one decode segment: 8 s, or 5 keyframe intervals) frames: fewer lanes, less memory
    lanes: Optional[int] = None
    # clips from folders of frames (YouTube-VOS layout: <frames>/JPEGImages/<video>/*.jpg) instead of videos
    frames: Optional[str] = None
    sampling: Literal["stride", "uniform", "dense"] = "stride"  # frame folders only (TimeT: uniform)
    synth: SynthConfig = field(default_factory=SynthConfig)

    def validate(self) -> None:
        at_least(self, 1, "frames_per_clip", "batch_size", "prefetch_factor")
        positive(self, "stride")
        at_least(self, 0, "num_workers")
        at_least(self, 16, "short_side")
        if self.lanes is not None and self.lanes < 1:
            raise ValueError(f"lanes must be >= 1 or null, got {self.lanes}")
        if self.clips_per_epoch != CLIPS_PER_EPOCH_FRAMES and self.clips_per_epoch < self.batch_size:
            raise ValueError(f"clips_per_epoch ({self.clips_per_epoch}) must be >= batch_size ({self.batch_size}) "
                             f"or '{CLIPS_PER_EPOCH_FRAMES}'")


@dataclass
class CropsConfig:
    """GPU multi-crop (``wtours.stages.video.augment.ClipAugment``); sizes in pixels, scales as area fractions."""

    precrop_size: int = 300
    precrop_scale: tuple[float, float] = (0.2, 1.0)
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_number: int = 6
    local_size: int = 112
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    local_flip_p: float = 0.0
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_global_p: float = 0.1
    blur_local_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    photometric: Literal["frame", "clip"] = "frame"
    # precrop: views cut from a pre-crop resized to precrop_size (DoRA); frame: RandomResizedCrops of the whole
    # frame, the precrop_* keys unused (TimeT's reference, timet.md §1.2)
    views_from: Literal["precrop", "frame"] = "precrop"
    # all: the four colour-jitter ops in a random order (torchvision); one: only the last of them (TimeT's reference)
    jitter_ops: Literal["all", "one"] = "all"

    def validate(self) -> None:
        for name in ("precrop_size", "global_size", "local_size"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name}: must be >= 8 pixels, got {getattr(self, name)}")
        if self.local_number < 0:
            raise ValueError(f"local_number: must be >= 0, got {self.local_number}")
        for name in ("precrop_scale", "global_scale", "local_scale"):
            check_range(name, getattr(self, name), 1e-4, 1.0)
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio: expected 0 < min <= max, got {list(self.ratio)}")
        for name in ("flip_p", "local_flip_p", "jitter_p", "grayscale_p", "blur_global_p", "blur_local_p"):
            check_prob(name, getattr(self, name))
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue: must lie in [0, 0.5], got {self.hue}")
        if self.blur_sigma[0] <= 0 or self.blur_sigma[0] > self.blur_sigma[1]:
            raise ValueError(f"blur_sigma: expected 0 < min <= max, got {list(self.blur_sigma)}")


class CropDetail(NamedTuple):
    """The smallest crop of one kind of the recipe, in source pixels (side of a square of its area).

    ``source_side``: what the crop covers of the frames it is cut from (``sqrt(area)``; the aspect jitter
    ``crops.ratio`` stretches one side by up to ``sqrt(4/3)`` more, which is left out as in the figures of
    dora.md). ``size``: its output side. ``reference_side``: what it covers in the reference, which resizes
    its pre-crop to ``precrop_size`` and cuts the global and local views from that image (dora.md §1.3), so
    they have at most ``sqrt(scale) x precrop_size`` pixels of detail (the reference itself upsamples its
    smallest global view 190 -> 224 px and local crop 67 -> 112 px)."""

    name: str
    source_side: float
    size: int
    reference_side: float

    @property
    def upsample(self) -> float:
        """Output side over covered source side (> 1: the crop is enlarged)."""
        return self.size / self.source_side

    @property
    def below_reference(self) -> bool:
        """Less source detail than the reference gives this crop."""
        return self.source_side < self.reference_side * (1 - 1e-3)


def smallest_crops(c: "CropsConfig", height: float, width: float) -> list[CropDetail]:
    """The recipe's smallest pre-crop, global view and local crop (:class:`CropDetail`) for frames of
    ``height x width`` pixels of detail: our crops are cut from the (decoded) frame in one resampling
    (:mod:`wtours.stages.video.augment`), so the pre-crop's scale and the view's scale multiply::

        pre = sqrt(precrop_scale[0] * H * W)       global = sqrt(global_scale[0]) * pre
        local = sqrt(local_scale[0]) * pre

    e.g. 640x360: 215 / 136 / 48 px for 300 / 224 / 112 outputs; 960x540: 322 / 204 / 72 px."""
    frame = c.views_from == "frame"  # no pre-crop: the views are cut from the whole frame (nothing enlarged first)
    pre = math.sqrt((1.0 if frame else c.precrop_scale[0]) * height * width)
    out = [] if frame else [CropDetail("pre-crop", pre, c.precrop_size, float(c.precrop_size))]
    for name, scale, size in (("global view", c.global_scale[0], c.global_size),
                              ("local crop", c.local_scale[0], c.local_size)):
        if name == "local crop" and c.local_number == 0:
            continue
        ref = math.sqrt(scale) * (pre if frame else c.precrop_size)
        out.append(CropDetail(name, math.sqrt(scale) * pre, size, min(float(size), ref)))
    return out


def min_short_side(c: "CropsConfig", aspect: float) -> int:
    """The smallest even ``data.short_side`` whose frames (``aspect`` = W/H) give the smallest pre-crop at least
    ``precrop_size`` source pixels (then no crop has less detail than in the reference)."""
    elong = max(aspect, 1.0 / aspect)  # frame area = short_side^2 * elong
    s = c.precrop_size / math.sqrt(c.precrop_scale[0] * elong)
    return int(math.ceil(s / 2.0 - 1e-9)) * 2


def detail_problem(c: "CropsConfig", height: float, width: float, where: str = "") -> str | None:
    """One line when some crop of the recipe gets less source detail than the reference gives it (its pre-crop
    is enlarged), else None. ``where``: what the frames are (e.g. "at data.short_side 360")."""
    crops = smallest_crops(c, height, width)
    if not any(d.below_reference for d in crops):
        return None
    parts = ", ".join(f"{d.name} {d.source_side:.0f} px -> {d.size} (reference {d.reference_side:.0f})" for d in crops)
    return (f"{where + ': ' if where else ''}the recipe's smallest crops cover fewer source pixels than in the DoRA "
            f"reference, whose pre-crop is never enlarged ({int(round(width))}x{int(round(height))} frames: {parts})")


def crop_fit_problems(c: "CropsConfig", d: "DataConfig") -> list[str]:
    """One line per crop kind whose smallest box can never fit where it is cut from (the frames of
    ``data.short_side`` x ``data.aspect``, or the square pre-crop canvas): the sampler would otherwise fall back
    to the same centre box every time (:func:`wtours.stages.video.augment.crop_fit_problem`)."""
    from wtours.stages.video.augment import crop_fit_problem

    a = d.aspect
    h, w = (float(d.short_side), d.short_side * a) if a >= 1 else (d.short_side / a, float(d.short_side))
    p = float(c.precrop_size)
    if c.views_from == "frame":
        kinds = [("crops.global_scale", c.global_scale, h, w), ("crops.local_scale", c.local_scale, h, w)]
    else:
        kinds = [("crops.precrop_scale", c.precrop_scale, h, w), ("crops.global_scale", c.global_scale, p, p),
                 ("crops.local_scale", c.local_scale, p, p)]
    if c.local_number == 0:
        kinds.pop()
    found = (crop_fit_problem(name, tuple(scale), tuple(c.ratio), hh, ww) for name, scale, hh, ww in kinds)
    return [f for f in found if f is not None]


@dataclass
class ModelConfig:
    """Backbone (timm name, random init) and the DINO projection head."""

    arch: str = "vit_small_patch16_224"
    drop_path_rate: float = 0.1
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = False
    # DINO head precision under bf16 autocast: "head" (all of it in fp32), "last_layer" (normalise + prototypes
    # layer in fp32) or "off" (autocast dtype); the teacher's sharp targets move by ~1e-3 nats in bf16 (heads.py)
    head_fp32: Literal["head", "last_layer", "off"] = "head"
    # position embeddings at other input sizes (112 px local crops): "dino" as DINO / DoRA (bicubic, scale factor,
    # no antialias), or "timm" (bicubic with antialias to the size; ~9 % apart at 112 px); wtours.models.vit
    pos_interp: Literal["dino", "timm"] = "dino"
    # start from these backbone weights (backbone.pt, a timm ViT state dict) instead of random init
    init: Optional[str] = None
    train_blocks: int = 0  # train only the last N transformer blocks (0: the whole backbone; TimeT: 2)

    def validate(self) -> None:
        from wtours.models.weights import vit_arch_problem

        problem = vit_arch_problem(self.arch)
        if problem:
            raise ValueError(f"arch: {problem}")
        at_least(self, 0, "train_blocks")
        if self.out_dim < 2:
            raise ValueError(f"out_dim: must be >= 2, got {self.out_dim}")
        if not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"drop_path_rate: must lie in [0, 1), got {self.drop_path_rate}")
        at_least(self, 1, "head_layers")


@dataclass
class TrackingConfig:
    """Multi-object discovery on frame 0 and tracking into every frame (dora.md §3)."""

    objects: int = 3
    per_sample_heads: bool = False
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 30
    threshold: Literal["batch", "sample"] = "batch"
    # false: no tracking, plain DINO multi-crop through the same code (the student's global branch sees the
    # teacher's whole global view once instead of k masked copies); an ablation, not DoRA
    enabled: bool = True

    def validate(self) -> None:
        at_least(self, 1, "objects")
        if self.sinkhorn_eps <= 0 or self.sinkhorn_iters < 1:
            raise ValueError("sinkhorn_eps must be > 0 and sinkhorn_iters >= 1")


@dataclass
class LossConfig:
    """DINO cross-entropy with centring; teacher temperature warms up linearly."""

    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    center_momentum: float = 0.9
    compat_reference: bool = False
    # departures for small data (DINOv2): "sinkhorn" replaces the centre by Sinkhorn-Knopp targets
    centering: Literal["center", "sinkhorn"] = "center"
    sinkhorn_iters: int = 3
    koleo_weight: float = 0.0  # KoLeo on the student's [CLS] of the masked views (DINOv2: 0.1)
    # centering "sinkhorn": rows of past teacher bottlenecks (SwAV's queue) that join each step's Sinkhorn
    # problem, scored by the current teacher prototypes; 0: the step's rows alone (DINOv2)
    sinkhorn_queue: int = 0
    # the student also sees each frame's whole global view (wtours departure; DoRA: "none"): "other_frame" trains
    # it towards the teacher's target of the next frame of the clip (t -> t+1, the last -> frame 0), "same_frame"
    # towards its own frame's; it joins the k masked views as one more global view (issue 16: without it the
    # student never sees the kind of view the targets come from, and at small scale the network's output on
    # whole views drifts to one point: uniform targets)
    full_view: Literal["none", "other_frame", "same_frame"] = "none"
    full_view_weight: float = 0.5  # its share of the global half of the loss (the k masked views share the rest)

    def validate(self) -> None:
        positive(self, "student_temp", "teacher_temp", "warmup_teacher_temp")
        at_least(self, 1, "sinkhorn_iters")
        at_least(self, 0, "sinkhorn_queue")
        check_prob("full_view_weight", self.full_view_weight)
        if self.koleo_weight < 0:
            raise ValueError(f"koleo_weight: must be >= 0, got {self.koleo_weight}")
        check_prob("center_momentum", self.center_momentum)


@dataclass
class ObjectiveConfig:
    """Stage-1 objectives and their weights in the loss (either may be 0, not both)."""

    dora: float = 1.0
    timet: float = 0.0

    def validate(self) -> None:
        for name in ("dora", "timet"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: a weight must be >= 0, got {getattr(self, name)}")
        if self.dora == 0 and self.timet == 0:
            raise ValueError("dora, timet: every objective weight is 0; give at least one a positive weight")

    def enabled(self) -> dict[str, float]:
        """``{name: weight}`` of the objectives with a positive weight, in a fixed order."""
        return {k: float(getattr(self, k)) for k in ("dora", "timet") if getattr(self, k) > 0}


@dataclass
class TimeTConfig:
    """TimeT (Salehi et al., ICCV 2023; ``shared/reference/timet.md`` §1, defaults of its ``get_loss``)."""

    head_hidden: tuple[int, ...] = (1024, 1024, 512)
    head_out: int = 256
    prototypes: int = 200
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 10
    context_frames: int = 7  # previously forwarded frames in the forwarder's context, besides frame 0
    window: int = 6  # spatial window of the forwarder, in patches (+-); 0: the whole frame
    topk: int = 5
    affinity_temp: float = 0.1
    temperature: float = 0.1  # of the student's softmax in the cross-entropy
    loss_frames: Literal["all", "last"] = "all"  # reference: last
    forwarder_features: Literal["student", "teacher"] = "student"  # reference: student (detached)
    compat_reference: bool = False  # the reference's swapped EMA (teacher ~ student); timet.md §1.4

    def validate(self) -> None:
        at_least(self, 2, "prototypes")
        at_least(self, 1, "head_out", "sinkhorn_iters", "context_frames", "topk")
        at_least(self, 0, "window")
        positive(self, "sinkhorn_eps", "affinity_temp", "temperature")
        if any(h < 1 for h in self.head_hidden):
            raise ValueError(f"head_hidden: widths must be >= 1, got {list(self.head_hidden)}")


@dataclass
class OptimConfig:
    """AdamW with per-step cosine schedules (DINO style)."""

    lr: float = 5e-4
    lr_batch_reference: int = 256
    min_lr: float = 1e-5
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    momentum_teacher: float = 0.996
    clip_grad: float = 3.0
    freeze_last_layer_epochs: float = 1
    backbone_lr_scale: float = 1.0  # the backbone's lr relative to the heads' (TimeT fine-tuning: 0.1)

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError("lr must be > 0 and min_lr >= 0")
        if not 0 < self.backbone_lr_scale <= 1000:
            raise ValueError(f"backbone_lr_scale: must lie in (0, 1000], got {self.backbone_lr_scale}")
        at_least(self, 1, "lr_batch_reference")
        if not 0 <= self.momentum_teacher <= 1:
            raise ValueError(f"momentum_teacher: must lie in [0, 1], got {self.momentum_teacher}")
        if self.clip_grad < 0:
            raise ValueError(f"clip_grad: must be >= 0 (0 turns clipping off), got {self.clip_grad}")


@dataclass
class VideoPretrainConfig:
    """Everything ``wtours pretrain`` needs besides the videos (given on the command line)."""

    name: str = "dora"
    seed: int = 0
    videos: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    timet: TimeTConfig = field(default_factory=TimeTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        """Checks across sections (each section has checked itself already). The ViT's patch size and
        heads come from the model itself, built on the ``meta`` device (no weights)."""
        from wtours.models.weights import vit_geometry

        c, arch = self.crops, self.model.arch
        geometry = vit_geometry(arch)
        dora = self.objective.dora > 0
        for name, size in (("global_size", c.global_size), ("local_size", c.local_size)):
            if size % geometry.patch_size and (dora or name == "global_size"):
                raise ValueError(f"crops.{name}: {size} is not a multiple of the patch size {geometry.patch_size} "
                                 f"of '{arch}'")
        if dora and c.local_number < 1:
            raise ValueError(f"crops.local_number: DoRA needs at least 1 local crop, got {c.local_number}")
        if dora and self.loss.compat_reference and self.loss.full_view != "none":
            raise ValueError(f"loss.full_view: {self.loss.full_view!r} is a departure from the reference; "
                             "loss.compat_reference needs 'none'")
        if dora and self.loss.compat_reference and c.local_number < 2:
            raise ValueError(f"crops.local_number: loss.compat_reference needs at least 2 local crops "
                             f"(the reference skips local crop 0), got {c.local_number}")
        if dora and self.tracking.objects > geometry.num_heads:
            raise ValueError(f"tracking.objects: {self.tracking.objects} objects need as many attention heads, "
                             f"'{arch}' has {geometry.num_heads}")
        if self.objective.timet > 0 and self.data.frames_per_clip < 2:
            raise ValueError(f"data.frames_per_clip: TimeT forwards labels through time and needs clips of at "
                             f"least 2 frames, got {self.data.frames_per_clip}")
        for problem in crop_fit_problems(c, self.data):
            raise ValueError(problem)
        if self.model.train_blocks > geometry.depth:
            raise ValueError(f"model.train_blocks: '{arch}' has {geometry.depth} blocks, got {self.model.train_blocks}")


def training_view(d: dict) -> dict:
    """The part of a config dict (:func:`wtours.config.to_dict`) that a resumed run must share with
    its checkpoint: everything except logging, devices, loader parallelism and checkpoint cadence."""
    d = dict(d)
    d.pop("name", None)
    d.pop("log", None)
    d["trainer"] = {k: v for k, v in d.get("trainer", {}).items() if k in TRAINING_TRAINER_KEYS}
    d["data"] = {k: v for k, v in d.get("data", {}).items() if k not in ("num_workers", "prefetch_factor")}
    if isinstance(d.get("crops"), dict):  # keys added by issue 18, left out at their defaults: older runs still resume
        d["crops"] = {k: v for k, v in d["crops"].items() if (k, v) not in (("views_from", "precrop"), ("jitter_ops", "all"))}
    if isinstance(d["data"].get("synth"), dict):  # the evaluation sets beside the tour do not change training
        d["data"]["synth"] = {k: v for k, v in d["data"]["synth"].items() if k not in ("sequences", "seq_frames")}
    return d


def training_hash(cfg: VideoPretrainConfig) -> str:
    """Hash of :func:`training_view` of ``cfg`` (stored in checkpoints, compared on resume)."""
    from wtours.config import to_dict

    return hash_training_view(training_view(to_dict(cfg)))

"""Settings of ``wtours eval clustering`` (``configs/eval/*.yaml``, ``--set key=value``).

Defaults reproduce TimeT's protocol (``../shared/reference/timet.md`` §2) with its bugs fixed:
224x224 squashed input, 4 frames per clip (evenly spaced instead of random), standardise + PCA to
50 dims, per-pixel k-means on features bilinearly upsampled to the GT size (224² for F / C,
112² for D), K = number of ground-truth labels in the pool, 50 Lloyd iterations x 5 restarts,
fitted on at most 256·K points (faiss's default), seed 1.

The reference's own choices, where ours differ and are kept as defaults (``configs/eval/timet_parity.yaml``
sets all of them):

================  ===================================  ==========================================
key               default (why)                        reference
================  ===================================  ==========================================
frame_sampling    ``even``: deterministic, no draw     ``random``: 4 random sorted frames per video,
                  variance in the score                a new draw per repeat (``repeats``: ± over draws)
pca_scope         ``clip``: the pool the score          ``batch``: one loader batch of
                  matches, independent of the video    ``batch_videos`` = 16 videos (videos in list order)
                  order
score_average     ``all``: every frame / clip alike    ``batch``: F / C averaged per batch of
                                                       ``batch_videos`` videos, then over batches
davis_annotations ``Annotations`` (DAVIS-2017 480p      ``Annotations_unsupervised`` if TimeT used the
                  semi-supervised masks, what most     DAVIS-2017 *Unsupervised* masks its README names
                  downloads hold)                      (unverified); recorded in metrics.json either way
================  ===================================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class EvalConfig:
    frames_per_clip: int = 4  # annotated frames per video (see frame_sampling); 0: all of them
    frame_sampling: Literal["even", "random"] = "even"  # random: sorted random frames, redrawn per repeat (reference)
    input_size: list[int] = field(default_factory=lambda: [224, 224])  # network input [H, W]
    eval_size: list[int] = field(default_factory=lambda: [224, 224])  # GT size for F and C [H, W]
    eval_size_dataset: list[int] = field(default_factory=lambda: [112, 112])  # GT size for D / overclustering
    standardize: bool = True
    pca_dim: int = 50  # 0: no PCA
    pca_scope: Literal["clip", "batch", "dataset"] = "clip"  # scaler + PCA pool for F / C (D: the dataset)
    batch_videos: int = 16  # videos per reference loader batch (pca_scope / score_average "batch")
    score_average: Literal["all", "batch"] = "all"  # F / C: mean over all frames / clips, or per batch first
    davis_annotations: str = "Annotations"  # DAVIS annotation folder (<root>/<this>/480p); Annotations_unsupervised
    cluster_at: Literal["pixel", "patch"] = "pixel"  # "patch": fit k-means on patch tokens (cheaper, not the protocol)
    niter: int = 50
    restarts: int = 5
    max_points_per_centroid: int = 256  # fit on at most this many points per centroid
    seed: int = 1
    repeats: int = 1  # k-means repeated with seeds seed, seed+1, ...; scores are mean ± std
    overcluster_k: list[int] = field(default_factory=list)  # dataset-wise K values, majority matching
    batch_size: int = 64  # frames per forward pass
    workers: int = 0  # decoding threads; 0: one per CPU core (at most 32)
    max_instance_id: int = 50  # DAVIS / synth masks: larger ids are reported as unexpected
    split_seed: int = 0  # YTVOS held-out split when no val.txt is found
    missing_annotations: Literal["error", "skip"] = "error"  # a frame without its PNG (or a PNG without its frame)
    memory_budget: int = 0  # elements of the largest clustering temporary; 0: 2^28 on CUDA, 2^26 on CPU
    overlays: int = 3  # sequences drawn as PNG / GIF overlays
    gif: bool = True
    progress: bool = True
    # a pipeline's eval stage also runs these dense instruments beside clustering, where the data allows
    # (propagation on DAVIS-layout sets; in-context and linear on category-labelled YTVOS-layout sets; the
    # synthetic tour's ground truth has both), with these configs ([] = clustering only)
    dense: list[str] = field(default_factory=lambda: ["propagation", "incontext", "linear"])
    propagation_config: str = "eval/propagation"
    incontext_config: str = "eval/incontext"
    linear_config: str = "eval/linear"

    def validate(self) -> None:
        if self.frames_per_clip < 0:
            raise ValueError(f"frames_per_clip must be >= 0 (0 = every annotated frame), got {self.frames_per_clip}")
        if self.batch_videos < 1:
            raise ValueError(f"batch_videos must be >= 1, got {self.batch_videos}")
        if not self.davis_annotations or any(c in self.davis_annotations for c in "/\\") \
                or self.davis_annotations in (".", ".."):
            raise ValueError(f"davis_annotations must be a folder name under the DAVIS root (e.g. Annotations, "
                             f"Annotations_unsupervised), got {self.davis_annotations!r}")
        if self.overlays < 0:
            raise ValueError(f"overlays must be >= 0, got {self.overlays}")
        for name in ("input_size", "eval_size", "eval_size_dataset"):
            v = getattr(self, name)
            if len(v) != 2 or min(v) < 1:
                raise ValueError(f"{name} must be [H, W] with positive values, got {v}")
        if self.pca_dim < 0:
            raise ValueError("pca_dim must be >= 0")
        if self.workers < 0:
            raise ValueError("workers must be >= 0")
        for name in ("niter", "restarts", "max_points_per_centroid", "repeats", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(k < 1 for k in self.overcluster_k):
            raise ValueError(f"overcluster_k values must be >= 1, got {self.overcluster_k}")
        if self.memory_budget < 0:
            raise ValueError("memory_budget must be >= 0")
        bad = [d for d in self.dense if d not in ("propagation", "incontext", "linear")]
        if bad:
            raise ValueError(f"dense: unknown instrument {bad[0]!r} (propagation, incontext, linear)")
        if not 0 < self.max_instance_id < 255:
            raise ValueError("max_instance_id must be in 1..254")

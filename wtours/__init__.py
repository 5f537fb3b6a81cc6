"""wtours: learn dense image encoders from long unlabelled walking-tour videos.

Public surface (see ARCHITECTURE.md): ``wtours.video.open_video``,
``wtours.objectives.sinkhorn.sinkhorn_knopp``, ``wtours.eval.metrics.cluster_miou`` and the
``wtours`` command line. ``import wtours`` registers wtours' CPU-scale ViTs (``vit_nano_patch8_64``) with
timm (:mod:`wtours._timm_registry`; timm itself is imported only when something uses it).
"""

from wtours._timm_registry import register_small_vits as _register_small_vits

__version__ = "0.1.0"

_register_small_vits()

"""wtours: learn dense image encoders from long unlabelled walking-tour videos.

Public surface (see ARCHITECTURE.md): ``wtours.video.open_video``,
``wtours.objectives.sinkhorn.sinkhorn_knopp``, ``wtours.eval.metrics.cluster_miou`` and the
``wtours`` command line.
"""

__version__ = "0.1.0"

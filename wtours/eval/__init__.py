"""Evaluation by unsupervised video segmentation clustering (TimeT's F / C / D protocol).

Modules: ``datasets`` (DAVIS-2017 / YouTube-VOS / synth readers), ``features`` (dense last-layer
patch tokens), ``kmeans`` (batched torch k-means), ``metrics`` (confusion by bincount, Hungarian /
majority matching, :func:`~wtours.eval.metrics.cluster_miou`), ``protocol`` (F / C / D,
overclustering), ``report`` (summary table, CSV, overlays), ``cli`` (``wtours eval clustering``,
:func:`~wtours.eval.cli.evaluate_clustering`), ``config`` (:class:`~wtours.eval.config.EvalConfig`).
"""

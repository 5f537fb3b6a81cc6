"""Evaluation of dense features: unsupervised clustering (TimeT's F / C / D), label propagation (DAVIS J&F),
in-context retrieval (Hummingbird) and a linear segmentation probe.

Modules: ``datasets`` (DAVIS-2017 / YouTube-VOS / synth readers), ``splits`` (train / held-out splits of
category-labelled sets), ``features`` (dense last-layer patch tokens; the ground-truth oracle field),
``kmeans`` (batched torch k-means), ``metrics`` (confusion by bincount, Hungarian / majority matching,
:func:`~wtours.eval.metrics.cluster_miou`), ``protocol`` (F / C / D, overclustering), ``report`` (summary
table, CSV, overlays), ``cli`` (``wtours eval clustering``, :func:`~wtours.eval.cli.evaluate_clustering`),
``config`` (:class:`~wtours.eval.config.EvalConfig`), ``davis_metrics`` (J / F / J&F as davis2017-evaluation),
``propagation`` (``wtours eval propagation``, :func:`~wtours.eval.propagation.evaluate_propagation`),
``incontext`` (``wtours eval incontext``, :func:`~wtours.eval.incontext.evaluate_incontext`), ``linear_probe``
(``wtours eval linear``, :func:`~wtours.eval.linear_probe.evaluate_linear`), ``common`` (encoder loading and
identity, mIoU of a confusion matrix).
"""

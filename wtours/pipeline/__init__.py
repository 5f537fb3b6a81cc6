"""Pipelines: named chains of stages (``pipelines/*.yaml``) run by ``wtours pretrain`` into one run directory.

:mod:`~wtours.pipeline.spec` reads and validates a pipeline file, :mod:`~wtours.pipeline.status` keeps each
stage's ``status.json`` and fingerprint, :mod:`~wtours.pipeline.run` runs the stages (resumably),
:mod:`~wtours.pipeline.tables` formats the per-stage metrics and the published numbers, and
:mod:`~wtours.pipeline.report` writes ``report.md`` / ``report.html``.
"""

"""Pipelines: named chains of stages (``pipelines/*.yaml``) run by ``wtours pretrain`` into one run directory.

:mod:`~wtours.pipeline.spec` reads and validates a pipeline file, :mod:`~wtours.pipeline.status` keeps each
stage's ``status.json`` and fingerprint, :mod:`~wtours.pipeline.run` runs the stages (resumably); the
per-stage tables and the report (``report.md`` / ``report.html``) are :mod:`wtours.report`'s.
"""

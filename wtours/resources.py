"""The presets shipped inside the package, found with :mod:`importlib.resources` (a non-editable install has
them too): ``wtours/configs/`` (one folder per stage: ``video/``, ``neco/``, ``eval/``) and ``wtours/pipelines/``
(named stage chains). The repository's top-level ``configs/`` and ``pipelines/`` are links to them, the
user-facing copies."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def data_dir(name: str) -> Path:
    """The folder ``name`` shipped in the ``wtours`` package (``configs``, ``pipelines``)."""
    return Path(str(files("wtours").joinpath(name)))


CONFIG_DIR = data_dir("configs")
PIPELINE_DIR = data_dir("pipelines")

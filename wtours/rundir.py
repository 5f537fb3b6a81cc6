"""The layout of a run directory, as every part that reads one agrees on it.

* a stage alone: ``<run>/{config.yaml, stage1/, eval/, report.md}`` (``config_neco.yaml`` and ``stage2/`` for NeCo);
* a chain (:mod:`wtours.pipeline`): ``<run>/{pipeline.yaml, <stage>/..., <stage>/status.json, report.md,
  report.html}``, each training stage's own run directory ``<run>/<stage>/`` holding ``STAGE_SUBDIR[kind]/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: a training stage's folder inside its run directory, by stage kind
STAGE_SUBDIR = {"video": "stage1", "neco": "stage2"}
PIPELINE_FILE = "pipeline.yaml"
STATUS_FILE = "status.json"
STATES = ("pending", "running", "done")


def is_chain(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` is a pipeline run directory (it holds ``pipeline.yaml``)."""
    return (Path(run_dir) / PIPELINE_FILE).is_file()


def read_status(stage_dir: Path) -> dict[str, Any]:
    """The stage's status, or ``{"state": "pending"}`` when it has none (or an unreadable one)."""
    try:
        st = json.loads((stage_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {"state": "pending"}
    return st if isinstance(st, dict) and st.get("state") in STATES else {"state": "pending"}

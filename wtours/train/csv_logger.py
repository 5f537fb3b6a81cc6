"""``stage1/metrics.csv``: a Lightning logger of our own that keeps a run's history across resumes.

A subclass of the public ``lightning.pytorch.loggers.Logger``; it writes the file Lightning's
``CSVLogger`` writes (and :mod:`wtours.report`, :func:`wtours.train.stage_run.loss_endpoints` read): a
header of the sorted column names (``epoch``, ``step``, ``train/...``, ``perf/...``), one row per logging
step, empty cells for what was not logged at that step.

* Rows are appended, one ``write`` per flush (Lightning flushes after every logging step).
* When a new column appears, the file is rewritten under the wider header (temp file + rename).
* Resume (``keep_until_step=N``): before the first write, the rows of steps ``>= N`` (logged after the
  checkpoint being resumed) and rows cut short by a kill are dropped (temp file + rename), so the
  resumed run continues the file without duplicates. A new run in an old directory
  (``keep_until_step=None``) starts the file over.
* Only global rank 0 writes.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from wtours.fsutil import atomic_open

METRICS_FILE = "metrics.csv"


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class ResumableCSVLogger(Logger):
    """``<save_dir>/<name>/metrics.csv`` that appends across resumes (see the module docstring)."""

    def __init__(self, save_dir: str | Path, name: str, keep_until_step: int | None = None) -> None:
        super().__init__()
        self._save_dir = str(save_dir)
        self._name = name
        self.keep_until_step = keep_until_step
        self.path = Path(save_dir) / name / METRICS_FILE
        self._rows: list[dict[str, Any]] = []
        self._keys: list[str] | None = None  # the file's header, once the file is prepared

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Nothing: the run writes its resolved config to ``config.yaml``."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {k: _scalar(v) for k, v in metrics.items()}
        row["step"] = int(step) if step is not None else len(self._rows)
        self._rows.append(row)

    @rank_zero_only
    def save(self) -> None:
        """Write the buffered rows (see the module docstring)."""
        if not self._rows:
            return
        if self._keys is None:
            self._keys = self._prepare()
        rows, self._rows = self._rows, []
        new = set().union(*rows) - set(self._keys)
        if new or not self.path.is_file():
            old = self._read() if self.path.is_file() else []
            self._keys = sorted(set(self._keys) | new)
            self._rewrite(old + rows)
            return
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self._keys).writerows(rows)
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    # ------------------------------------------------------------------ the file

    def _read(self) -> list[dict[str, Any]]:
        """The complete rows of the file (a row cut short by a kill has None cells: dropped)."""
        with open(self.path, newline="") as f:
            return [r for r in csv.DictReader(f) if None not in r.values() and None not in r]

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        os.makedirs(self.path.parent, exist_ok=True)
        with atomic_open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._keys or ["step"])
            w.writeheader()
            w.writerows(rows)

    def _prepare(self) -> list[str]:
        """Before the first write: start over (new run) or keep the rows before ``keep_until_step`` (resume).
        Returns the header of the file the next rows go into."""
        if not self.path.is_file():
            return []
        if self.keep_until_step is None:
            self.path.unlink()
            return []
        with open(self.path, newline="") as f:
            fields = list(csv.DictReader(f).fieldnames or [])
        kept = [r for r in self._read()
                if r.get("step") not in (None, "") and int(float(r["step"])) < self.keep_until_step]
        self._keys = sorted(fields)
        self._rewrite(kept)
        return self._keys

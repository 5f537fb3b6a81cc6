"""Per-stage ``status.json`` of a pipeline run directory, and the fingerprints that decide re-runs.

Each stage folder holds ``status.json`` (written atomically)::

    {"stage": "neco", "kind": "neco", "state": "pending" | "running" | "done",
     "fingerprint": "sha256:...",            # config digest + the input backbone's checksum
     "config_digest": "sha256:...",          # the stage's config alone (what its user can change)
     "config": {...},                        # that config view, flattened (names the keys that changed)
     "input": {"stage": "video", "backbone_checksum": "sha256:..."} | null,
     "backbone": "neco/stage2/backbone.pt",  # relative to the run directory (training stages, once done)
     "backbone_checksum": "sha256:...",     # of its weights (arch + state_dict), see backbone_checksum
     "arch": "vit_nano_patch8_64", "seed": 0, "steps": 40,
     "started": "...", "finished": "...", "seconds": 12.3, "runs": 1}

A stage is *done* for a command when its status says ``done`` with the same fingerprint and (training
stages) its ``backbone.pt`` still carries the recorded checksum. ``seconds`` adds up every invocation
that worked on the stage (a resumed stage's time includes the part before the kill).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from wtours.fsutil import write_json
from wtours.integrity import content_digest
from wtours.rundir import STATES, STATUS_FILE, read_status  # noqa: F401 (public here too)



def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def digest(obj: Any) -> str:
    """Content digest of a JSON-like object (:func:`wtours.integrity.content_digest`, after a JSON round
    trip so that tuples and lists, Paths and strings hash alike)."""
    return content_digest(json.loads(json.dumps(obj, default=str)))


def fingerprint(config_digest: str, input_checksum: str | None) -> str:
    return digest({"config": config_digest, "input": input_checksum})


def write_status(stage_dir: Path, status: dict[str, Any]) -> dict[str, Any]:
    write_json(stage_dir / STATUS_FILE, status)
    return status


def backbone_checksum(path: Path) -> tuple[str | None, str | None]:
    """``(checksum, arch)`` of an exported ``backbone.pt``, ``(None, None)`` if absent or damaged.

    The file's own checksum is verified; the one returned covers the weights alone (``arch`` and
    ``state_dict``, not ``meta``, which holds paths), so the same weights have the same checksum in any
    run directory."""
    from wtours.errors import UserError
    from wtours.integrity import load_verified

    if not path.is_file():
        return None, None
    try:
        obj, verified = load_verified(path)
    except UserError:
        return None, None
    if not verified or not isinstance(obj, dict) or "state_dict" not in obj:
        return None, None
    return content_digest({"arch": obj.get("arch"), "state_dict": obj["state_dict"]}), obj.get("arch")

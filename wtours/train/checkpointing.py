"""Checkpoints that survive a kill: atomic writes, config checks on resume.

Lightning's ``TorchCheckpointIO`` serialises to memory and writes through an fsspec transaction;
whether that is a rename depends on the fsspec version, and it never fsyncs. For local paths
:class:`AtomicCheckpointIO` writes a temp file beside the target, fsyncs it and ``os.replace``-s
it over the old checkpoint (:func:`wtours.fsutil.torch_save`), so ``last.ckpt`` is always either
the previous or the new complete file.

:func:`check_resume` opens a checkpoint before ``trainer.fit(ckpt_path=...)`` and compares the
config hash it was written with (``checkpoint["wtours"]["config_hash"]``) with the current one,
naming the keys that differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from wtours.errors import UserError
from wtours.fsutil import torch_save
from wtours.train.video_config import training_view


def _is_local(path: Any) -> bool:
    s = str(path)
    return "://" not in s or s.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are temp file + fsync + ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        p = Path(str(path).removeprefix("file://"))
        torch_save(checkpoint, p)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The ``wtours`` block of a training checkpoint (config hash, config, arch, ...)."""
    p = Path(path)
    if not p.is_file():
        raise UserError("checkpoint to resume from not found" if not p.exists() else "not a checkpoint file", path=p)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"cannot read checkpoint ({type(e).__name__}: {msg})", path=p) from None
    if not isinstance(ckpt, dict) or "wtours" not in ckpt or "state_dict" not in ckpt:
        raise UserError("not a 'wtours pretrain' training checkpoint", path=p)
    meta = dict(ckpt["wtours"])
    meta["global_step"] = int(ckpt.get("global_step", 0))
    return meta


def check_resume(path: str | Path, config_hash: str, config: dict[str, Any]) -> dict[str, Any]:
    """Raise a one-line :class:`UserError` unless ``path`` was written by this config."""
    meta = read_checkpoint_meta(path)
    if meta.get("config_hash") != config_hash:
        old, new = _flatten(training_view(meta.get("config", {}))), _flatten(training_view(config))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
        raise UserError(f"checkpoint was written with another config ({detail or 'hash differs'}{more}); "
                        "resume with the same config, or start over with --fresh or another --out", path=path)
    return meta

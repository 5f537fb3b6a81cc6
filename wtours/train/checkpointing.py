"""Checkpoints that survive a kill and are verified before use.

Lightning's ``TorchCheckpointIO`` serialises to memory and writes through an fsspec transaction;
whether that is a rename depends on the fsspec version, and it never fsyncs. For local paths
:class:`AtomicCheckpointIO` writes a temp file beside the target, fsyncs it and ``os.replace``-s
it over the old checkpoint (:func:`wtours.fsutil.torch_save`), so ``last.ckpt`` is always either
the previous or the new complete file. Every checkpoint carries a checksum of its content
(:mod:`wtours.integrity`), verified whenever it is read; files are read with ``weights_only=True``
(files that need pickle only with ``trust=True``, i.e. ``--trust-checkpoint``).

:func:`check_resume` (= :func:`read_checkpoint_meta` + :func:`check_config`) opens a checkpoint
before ``trainer.fit(ckpt_path=...)`` and compares the config hash it was written with
(``checkpoint["wtours"]["config_hash"]``) with the current one, naming the keys that differ.

:func:`rng_state` / :func:`set_rng_state`: the process's random streams, as both stages keep them in
``checkpoint["wtours"]["rng"]`` for exact resume.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from wtours.config import changed_keys, flatten, to_dict
from wtours.errors import UserError
from wtours.fsutil import torch_save
from wtours.integrity import load_verified, seal


RESUME_HINT = "restore it from a copy, or start over with --fresh"

#: ``checkpoint["wtours"]["layout"]``: the state-dict layout a checkpoint was written with. 3: backbones as
#: ``student.vit.*`` / ``teacher.vit.*``, each objective's heads and state under ``objective.<name>.*``
#: (``dora``, ``timet``); 2: one objective under ``objective.*``; 1: DoRANet.
CHECKPOINT_LAYOUT = 3


def _is_local(path: Any) -> bool:
    s = str(path)
    return "://" not in s or s.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are temp file + fsync + ``os.replace``, sealed with a
    checksum, and whose loads are ``weights_only`` (unless ``trust``) and verified.

    ``on_saved(path, global_step)`` is called after each completed local save (the run uses it to
    drop the directory a ``--fresh`` start moved aside, and to name the last good checkpoint).
    """

    def __init__(self, trust: bool = False, on_saved: Callable[[Path, int], None] | None = None) -> None:
        super().__init__()
        self.trust = trust
        self.on_saved = on_saved

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        sealed = seal(checkpoint)
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(sealed, path, storage_options)
        p = Path(str(path).removeprefix("file://"))
        torch_save(sealed, p)
        if self.on_saved is not None:
            self.on_saved(p, int(checkpoint.get("global_step", 0)))

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        if not _is_local(path):
            raise UserError("only local checkpoints can be resumed", path=path)
        ckpt, _ = load_verified(Path(str(path).removeprefix("file://")), trust=self.trust, hint=RESUME_HINT)
        return ckpt


def config_changed(old_view: dict[str, Any], new_view: dict[str, Any], path: str | Path) -> UserError:
    """The one-line error for resuming ``path`` with another config: names up to 4 changed keys of the two
    training views (both stages use it)."""
    old, new = flatten(old_view), flatten(new_view)
    changed = changed_keys(old, new)
    detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
    more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
    return UserError(f"checkpoint was written with another config ({detail or 'hash differs'}{more}); "
                     "resume with the same config, or start over with --fresh or another --out", path=path)


def read_checkpoint_meta(path: str | Path, trust: bool = False, command: str = "pretrain",
                         stage: str | None = None) -> dict[str, Any]:
    """The ``wtours`` block of a training checkpoint (config hash, config, arch, ...), its
    ``global_step`` and ``verified`` (False: written without a checksum, by an older wtours).
    A damaged file, or one that is not a training checkpoint of ``wtours <command>`` (with ``stage``: whose
    ``wtours`` block names that stage), raises a one-line :class:`UserError`."""
    p = Path(path)
    if not p.is_file():
        raise UserError("checkpoint to resume from not found" if not p.exists() else "not a checkpoint file", path=p)
    ckpt, verified = load_verified(p, trust=trust, hint=RESUME_HINT)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("wtours"), dict) or "state_dict" not in ckpt \
            or (stage is not None and ckpt["wtours"].get("stage") != stage):
        raise UserError(f"not a 'wtours {command}' training checkpoint", path=p)
    meta = dict(ckpt["wtours"])
    meta["global_step"] = int(ckpt.get("global_step", 0))
    meta["verified"] = verified
    return meta


def _same(view: dict[str, Any]) -> dict[str, Any]:
    return view


def check_config(meta: dict[str, Any], config_hash: str, config: dict[str, Any], path: str | Path,
                 view: Callable[[dict[str, Any]], dict[str, Any]] = _same, layout: int | None = CHECKPOINT_LAYOUT
                 ) -> None:
    """Raise a one-line :class:`UserError` unless the checkpoint ``meta`` (:func:`read_checkpoint_meta`)
    of ``path`` was written by this config (and, unless ``layout`` is None, in that state-dict layout).
    ``view``: the stage's training view of a config dict (the keys that decide the hash), to name the
    keys that differ."""
    have = int(meta.get("layout", 1))
    if layout is not None and have != layout:
        raise UserError(f"checkpoint was written by {'an older' if have < layout else 'a newer'} wtours "
                        f"(checkpoint layout {have}, this one reads {layout}) and cannot be resumed; "
                        "start over with --fresh or another --out (an exported backbone.pt stays usable)", path=path)
    if meta.get("config_hash") != config_hash:
        raise config_changed(view(meta.get("config", {})), view(config), path)


def check_resume(path: str | Path, config_hash: str, config: dict[str, Any], trust: bool = False,
                 view: Callable[[dict[str, Any]], dict[str, Any]] = _same) -> dict[str, Any]:
    """Raise a one-line :class:`UserError` unless ``path`` is intact and was written by this config."""
    meta = read_checkpoint_meta(path, trust)
    check_config(meta, config_hash, config, path, view)
    return meta


def rng_state() -> dict[str, Any]:
    """The process's random streams (torch, python, numpy, CUDA) for ``checkpoint["wtours"]["rng"]``;
    numpy's global state with tensors instead of arrays (loads with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restore the streams of :func:`rng_state` (CUDA's only on as many devices as were saved)."""
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and platforms)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class ResumableState:
    """What every stage's LightningModule keeps in ``checkpoint["wtours"]`` for an exact resume, as a mixin
    (``class M(ResumableState, pl.LightningModule)``): the config (and its hash), ``ema_updates``, the
    augmentation's state and the process's random streams (:func:`rng_state`), plus the stage's own entries
    (:meth:`checkpoint_state` / :meth:`load_checkpoint_state`).

    The module provides ``cfg``, ``config_hash``, ``ema_updates`` and ``augment`` (with ``state_dict`` /
    ``load_state_dict``)."""

    cfg: Any
    config_hash: str
    ema_updates: int
    augment: Any

    def checkpoint_state(self) -> dict[str, Any]:
        """The stage's own entries of ``checkpoint["wtours"]`` (``arch``, ``stage``, queues, ...)."""
        return {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore the stage's own entries (called before the random streams are restored)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["wtours"] = {"config_hash": self.config_hash, "config": to_dict(self.cfg),
                                "ema_updates": self.ema_updates, "augment": self.augment.state_dict(),
                                **self.checkpoint_state(), "rng": rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        st = checkpoint.get("wtours", {})
        self.ema_updates = int(st.get("ema_updates", 0))
        if "augment" in st:
            self.augment.load_state_dict(st["augment"])
        self.load_checkpoint_state(st)
        rng = st.get("rng")
        if rng:
            set_rng_state(rng)

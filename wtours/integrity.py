"""Checkpoint integrity: a content checksum stored inside the file, and safe loading.

``torch.load`` does not notice flipped bytes inside a tensor's storage, so every file wtours writes
carries a sha256 of its own content, computed over the loaded *structure* (not the file bytes, so
that it travels inside the payload and is written atomically with it):

* dict keys in sorted order, lists / tuples / sets, ``str``, ``bytes``, ``int``, ``float``, ``bool``,
  ``None``, each tagged with its type;
* tensors as ``(dtype, shape, raw bytes)`` of their contiguous CPU copy.

The digest (``"sha256:<hex>"``) is stored under :data:`CHECKSUM_KEY` at the top level of a training
checkpoint, and in ``meta`` of a ``backbone.pt`` (whose top level stays ``{"arch", "state_dict",
"meta"}``); the key itself is left out of the digest. :func:`verify` recomputes it::

    torch_save(seal(ckpt), path)                       # write
    obj, verified = load_verified(path)                # read: UserError if damaged

Files without a checksum (DINO's released ``.pth``, checkpoints of other tools) load as
*unverified* (``verified`` is False). :func:`safe_load` reads with ``weights_only=True``; a file
that needs pickle (arbitrary Python objects, which can run code while loading) is refused unless
``trust=True``.
"""

from __future__ import annotations

import hashlib
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from wtours.errors import UserError

CHECKSUM_KEY = "wtours_checksum"
ALGORITHM = "sha256"
TRUST_HINT = ("contains pickled Python objects that could run code when loaded; "
              "pass --trust-checkpoint if you trust its source")


def content_digest(obj: Any) -> str:
    """``"sha256:<hex>"`` of ``obj``'s canonical content (see the module docstring)."""
    h = hashlib.new(ALGORITHM)
    _feed(h, obj)
    return f"{ALGORITHM}:{h.hexdigest()}"


def _feed(h: Any, o: Any) -> None:
    if isinstance(o, torch.Tensor):
        t = o.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().resolve_conj().resolve_neg().contiguous()
        head = f"{t.dtype}|{tuple(t.shape)}|".encode()
        h.update(b"x" + struct.pack("<Q", len(head)) + head)
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(o, dict):
        items = sorted(o.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        h.update(b"d" + struct.pack("<Q", len(items)))
        for k, v in items:
            _feed(h, k)
            _feed(h, v)
    elif isinstance(o, (list, tuple)):
        h.update((b"l" if isinstance(o, list) else b"t") + struct.pack("<Q", len(o)))
        for v in o:
            _feed(h, v)
    elif isinstance(o, (set, frozenset)):
        h.update(b"S" + struct.pack("<Q", len(o)))
        for v in sorted(o, key=repr):
            _feed(h, v)
    elif o is None or isinstance(o, bool):
        h.update({None: b"N", True: b"T", False: b"F"}[o])
    elif isinstance(o, int):
        s = str(o).encode()
        h.update(b"i" + struct.pack("<Q", len(s)) + s)
    elif isinstance(o, float):
        h.update(b"f" + struct.pack("<d", o))
    elif isinstance(o, (str, bytes, bytearray)):
        b = o.encode("utf-8", "surrogatepass") if isinstance(o, str) else bytes(o)
        h.update((b"s" if isinstance(o, str) else b"b") + struct.pack("<Q", len(b)) + b)
    else:  # torch.dtype, torch.device, ...: the few other types weights_only loading allows
        s = f"{type(o).__module__}.{type(o).__qualname__}:{o!r}".encode()
        h.update(b"r" + struct.pack("<Q", len(s)) + s)


def _holder(obj: Any) -> dict | None:
    """The dict that holds (or would hold) the checksum: the top level, or ``meta`` of a backbone."""
    if not isinstance(obj, dict):
        return None
    if CHECKSUM_KEY in obj:
        return obj
    meta = obj.get("meta")
    if isinstance(meta, dict) and CHECKSUM_KEY in meta:
        return meta
    return None


def _without_checksum(obj: dict, holder: dict) -> dict:
    if holder is obj:
        return {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    return {**obj, "meta": {k: v for k, v in holder.items() if k != CHECKSUM_KEY}}


def seal(obj: dict, in_meta: bool = False) -> dict:
    """A shallow copy of ``obj`` carrying its checksum (top level, or in ``obj["meta"]``)."""
    if in_meta:
        meta = {k: v for k, v in dict(obj.get("meta") or {}).items() if k != CHECKSUM_KEY}
        base = {**obj, "meta": meta}
        return {**base, "meta": {**meta, CHECKSUM_KEY: content_digest(base)}}
    base = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    return {**base, CHECKSUM_KEY: content_digest(base)}


def verify(obj: Any, path: str | Path, hint: str = "") -> bool:
    """True if ``obj`` carries a checksum that matches, False if it carries none; a one-line
    :class:`UserError` naming ``path`` (and ending with ``hint``) if it does not match: the file
    was damaged after it was written."""
    holder = _holder(obj)
    if holder is None:
        return False
    want = holder[CHECKSUM_KEY]
    if not isinstance(want, str) or ":" not in want or want.split(":", 1)[0] not in hashlib.algorithms_available:
        raise UserError(f"checksum mismatch: unreadable checksum {str(want)[:40]!r}: the file is damaged"
                        + (f"; {hint}" if hint else ""), path=path)
    algo = want.split(":", 1)[0]
    h = hashlib.new(algo)
    _feed(h, _without_checksum(obj, holder))
    if f"{algo}:{h.hexdigest()}" != want:
        raise UserError("checksum mismatch: the file is damaged (its content changed after it was written)"
                        + (f"; {hint}" if hint else ""), path=path)
    return True


def safe_load(path: str | Path, trust: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with one-line errors naming ``path``.

    A file that needs full unpickling is refused (nothing in it is executed) unless ``trust``.
    """
    p = Path(path)
    if not p.exists():
        raise UserError("checkpoint not found", path=p)
    if not p.is_file():
        raise UserError("is a directory, expected a checkpoint file" if p.is_dir() else "not a file", path=p)
    if not trust:
        unsafe = _unsafe_globals(p)
        if unsafe:
            raise UserError(f"{TRUST_HINT} ({', '.join(unsafe[:3])})", path=p)
    try:
        with warnings.catch_warnings():  # torch's warnings about pickle protocols: our one line says it all
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        text = str(e)
        if "WeightsUnpickler error:" in text:  # torch's long weights_only message: keep its cause
            text = text.split("WeightsUnpickler error:", 1)[1]
            m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            if m:  # a legacy (non-zip) pickle with Python objects
                raise UserError(f"{TRUST_HINT} ({m.group(1)})", path=p) from None
            cause = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")[:120]
            if not trust and _is_pickle(p):  # e.g. a legacy pickle of protocol 4 (torch's advice is cut)
                raise UserError(f"cannot be read safely (weights_only: {cause}); it may hold pickled Python objects "
                                "that could run code when loaded: pass --trust-checkpoint if you trust its source",
                                path=p) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        first = lines[0][:200] if lines else ""
        raise UserError(f"cannot read checkpoint ({type(e).__name__}: {first})", path=p) from None


def _is_pickle(p: Path) -> bool:
    """Whether ``p`` starts like a pickle of protocol 2-5 (``PROTO`` opcode), as torch's legacy files and
    plain pickles do; junk does not."""
    try:
        with open(p, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _unsafe_globals(p: Path) -> list[str]:
    """Python objects a zip checkpoint's pickle would import, beyond what ``weights_only`` allows
    (read from the pickle's opcodes; nothing is executed). Empty for legacy or unreadable files."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(p)))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: torch.load below decides
        return []


def load_verified(path: str | Path, trust: bool = False, hint: str = "") -> tuple[Any, bool]:
    """:func:`safe_load` + :func:`verify` -> ``(object, verified)``."""
    obj = safe_load(path, trust)
    return obj, verify(obj, path, hint)

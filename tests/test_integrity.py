"""Checksums inside checkpoints, safe loading, atomic writes that fail cleanly, stale temp files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from wtours.errors import UserError
from wtours.integrity import CHECKSUM_KEY, content_digest, load_verified, safe_load, seal, verify


def flip_tensor_bytes(path: Path, n: int = 16) -> str:
    """Flip ``n`` bytes in the middle of the largest tensor whose bytes occur once in the file (its
    storage, inside the zip) -> that tensor's key. ``torch.load`` alone does not notice."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj["state_dict"] if isinstance(obj, dict) and "state_dict" in obj else obj
    data = bytearray(Path(path).read_bytes())
    for key in sorted(sd, key=lambda k: -sd[k].numel()):
        raw = sd[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if len(raw) < 4 * n:
            continue
        at = data.find(raw[:1024])
        if at >= 0 and data.find(raw[:1024], at + 1) < 0:
            mid = at + len(raw) // 2
            for i in range(mid, mid + n):
                data[i] ^= 0xFF
            Path(path).write_bytes(bytes(data))
            return key
    raise AssertionError(f"no tensor with unique bytes in {path}")


def test_digest_is_canonical_and_sensitive():
    a = {"b": [1, 2.5, None, True], "a": (torch.arange(6).reshape(2, 3), "x"), 3: b"raw"}
    b = {3: b"raw", "a": (torch.arange(6).reshape(2, 3), "x"), "b": [1, 2.5, None, True]}
    assert content_digest(a) == content_digest(b)  # key order does not matter
    assert content_digest(a).startswith("sha256:")
    t = torch.arange(6).reshape(2, 3)
    for other in ({**b, "a": (t.float(), "x")}, {**b, "a": (t.reshape(3, 2), "x")},
                  {**b, "a": (t + (t == 4), "x")}, {**b, "a": [t, "x"]}, {**b, "b": [1, 2.5, None, 1]}):
        assert content_digest(other) != content_digest(a)
    # a non-contiguous tensor hashes like its contiguous copy (that is what a load gives back)
    assert content_digest({"t": t.t()}) == content_digest({"t": t.t().contiguous()})


def test_seal_and_verify_round_trip_through_a_file(tmp_path):
    ck = seal({"state_dict": {"w": torch.randn(64, 64)}, "step": 3})
    assert set(ck) == {"state_dict", "step", CHECKSUM_KEY}
    torch.save(ck, tmp_path / "c.pt")
    obj, ok = load_verified(tmp_path / "c.pt")
    assert ok and obj["step"] == 3
    bb = seal({"arch": "a", "state_dict": {"w": torch.ones(3)}, "meta": {"steps": 1}}, in_meta=True)
    assert set(bb) == {"arch", "state_dict", "meta"} and CHECKSUM_KEY in bb["meta"]
    assert verify(bb, "bb.pt") is True
    assert verify({"state_dict": {}}, "foreign.pth") is False  # no checksum: unverified, accepted
    flip_tensor_bytes(tmp_path / "c.pt")
    torch.load(tmp_path / "c.pt", weights_only=True)  # torch itself loads the damaged file silently
    with pytest.raises(UserError, match=r"c\.pt: checksum mismatch: the file is damaged"):
        load_verified(tmp_path / "c.pt")
    bb["meta"]["steps"] = 2
    with pytest.raises(UserError, match="checksum mismatch"):
        verify(bb, "bb.pt")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("zipped", [True, False])
def test_pickled_objects_are_refused_without_trust_and_never_run(tmp_path, zipped):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _RunsCode(marker)}, path,
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(UserError) as e:
        safe_load(path)
    assert str(e.value).startswith(f"{path}: contains pickled Python objects that could run code")
    assert "--trust-checkpoint" in str(e.value) and "exec" in str(e.value)
    assert not marker.exists()
    safe_load(path, trust=True)  # the user said so: pickle runs
    assert marker.exists()


def test_junk_is_one_readable_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as e:
        safe_load(junk)
    assert str(e.value) == f"{junk}: cannot read checkpoint (UnpicklingError: Unsupported operand 110)"


class _FailingFile:
    """A file object whose writes fail after ``ok`` bytes with ``exc``."""

    def __init__(self, f, exc: BaseException, ok: int = 1000) -> None:
        self.f, self.exc, self.left = f, exc, ok

    def write(self, b):
        if len(b) > self.left:
            raise self.exc
        self.left -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


@pytest.mark.parametrize("exc, expected", [
    (KeyboardInterrupt(), KeyboardInterrupt),
    (OSError(errno.ENOSPC, "No space left on device"), OSError),
])
def test_torch_save_failing_mid_write_raises_the_real_error_and_keeps_the_old_file(tmp_path, monkeypatch, exc,
                                                                                   expected):
    import wtours.fsutil as fsutil

    path = tmp_path / "last.ckpt"
    fsutil.torch_save({"w": torch.zeros(4)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(fsutil, "_fdopen", lambda fd, *a, **k: _FailingFile(os.fdopen(fd, *a, **k), exc), raising=False)
    with pytest.raises(expected) as e:
        fsutil.torch_save({"w": torch.randn(100_000)}, path)
    assert type(e.value) is type(exc)  # not torch's "RuntimeError: enforce fail at inline_container.cc"
    if isinstance(exc, OSError):
        assert e.value.filename == str(path) and e.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_remove_stale_temps_only_touches_our_own_temp_names(tmp_path):
    from wtours.fsutil import remove_stale_temps

    ours = [".last.ckpt.k2j_x9a1.tmp", ".metrics.csv.abcdefgh.tmp"]
    others = ["last.ckpt", "notes.tmp", ".hidden.tmp", ".last.ckpt.tmp", ".last.ckpt.toolong12.tmp", "x.abcdefgh.tmp"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"12345")
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()
    assert remove_stale_temps(tmp_path) == (2, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + [".dir.abcdefgh.tmp"])

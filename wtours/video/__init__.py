"""Video layer: packet index, frame-accurate decoders, the sharded clip dataset, proxy transcode.

Public surface (imported lazily, so ``import wtours.video`` stays cheap and never pulls in the
downloader or the synthetic generator):

* :func:`open_video` / :class:`VideoFile` (:mod:`wtours.video.decode`)
* :func:`index_video` / :class:`VideoIndex` (:mod:`wtours.video.index`)
* :class:`ClipDataset`, :func:`clip_span_frames` (:mod:`wtours.video.clips`)
* :class:`FrameFolderClips` (:mod:`wtours.video.frames`): the same clips from folders of frames
* :func:`prepare_video` (:mod:`wtours.video.prepare`)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "open_video": "wtours.video.decode",
    "VideoFile": "wtours.video.decode",
    "index_video": "wtours.video.index",
    "VideoIndex": "wtours.video.index",
    "ClipDataset": "wtours.video.clips",
    "clip_span_frames": "wtours.video.clips",
    "FrameFolderClips": "wtours.video.frames",
    "prepare_video": "wtours.video.prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'wtours.video' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

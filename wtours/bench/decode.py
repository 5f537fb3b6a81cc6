"""``wtours bench decode``: delivered training frames/s per backend against the PyAV ceiling.

For each backend, the :class:`~wtours.video.clips.ClipDataset` runs behind a ``DataLoader`` with
``--workers`` workers and delivers ``--clips`` clips at the training short side. Reported per
backend: delivered frames/s (wall clock, worker start-up included), decoded frames per delivered
frame, peak memory of this process plus its workers (sum of PSS, so pages shared after fork count once), and the ratio to the *ceiling*:
PyAV decoding every frame of the same file, threads on, with no conversion at all. Goal: delivered
>= 0.8 x ceiling with a decode ratio <= 1.5.

Without a VIDEO it writes a synthetic 4K (3840x2160) 30 fps H.264 clip (a textured, panning and
zooming pattern with noise, 4 s, a keyframe per second) to a temp dir, so the bench runs in about
a minute on two cores.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from wtours.errors import UserError

T_DEFAULT = 8
STRIDE_DEFAULT = 60
SHORT_SIDE_DEFAULT = 256  # ClipDataset's default


def synth_4k_clip(path: Path, seconds: float = 4.0, fps: int = 30, width: int = 3840, height: int = 2160,
                  gop: int | None = None, seed: int = 0) -> Path:
    """A textured moving pattern (pan + noise), H.264 ``yuv420p``, keyframe every ``gop`` frames."""
    import av

    rng = np.random.default_rng(seed)
    # smooth multi-scale texture, twice the frame size so it can pan
    base = rng.integers(0, 256, size=(height // 16 + 8, width // 8 + 16, 3), dtype=np.uint8)
    tex = np.repeat(np.repeat(base, 16, axis=0), 8, axis=1)
    fine = rng.integers(0, 48, size=tex.shape[:2], dtype=np.uint8)[..., None]
    tex = np.clip(tex.astype(np.int16) // 2 + fine + 40, 0, 255).astype(np.uint8)
    noise = rng.integers(0, 12, size=(8, height, width, 1), dtype=np.uint8)
    n = int(round(seconds * fps))
    gop = gop or fps
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.codec_context.gop_size = gop
        s.codec_context.options = {"preset": "ultrafast", "crf": "23",
                                   "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        s.thread_type = "AUTO"
        for i in range(n):
            dx, dy = (7 * i) % (tex.shape[1] - width), (3 * i) % (tex.shape[0] - height)
            img = tex[dy: dy + height, dx: dx + width] + noise[i % 8]
            fr = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            fr.pts = i
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def ceiling_fps(path: str | Path) -> tuple[float, int]:
    """PyAV decoding every frame, threads on, no conversion: (frames/s, frames)."""
    from wtours.video.index import first_video_stream, open_container

    c = open_container(path)
    try:
        s = first_video_stream(c, path)
        s.thread_type = "AUTO"
        t0 = time.perf_counter()
        n = sum(1 for _ in c.decode(s))
        dt = time.perf_counter() - t0
    finally:
        c.close()
    return n / dt, n


class _PeakRSS:
    """Samples the resident memory of this process and its children (Linux /proc) every 50 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        pids, todo = [], [os.getpid()]
        while todo:
            p = todo.pop()
            pids.append(p)
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children") as f:
                        todo.extend(int(x) for x in f.read().split())
            except OSError:
                pass
        total = 0
        for p in pids:  # PSS (shared pages split between processes) where the kernel has it, else RSS
            try:
                with open(f"/proc/{p}/smaps_rollup") as f:
                    total += next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("Pss:"))
                continue
            except (OSError, StopIteration, ValueError):
                pass
            try:
                with open(f"/proc/{p}/statm") as f:
                    total += int(f.read().split()[1]) * self._page
            except OSError:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.05)

    def __enter__(self):
        if os.path.isdir("/proc/self"):
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._t.is_alive():
            self._t.join()
        if self.peak == 0:  # no /proc: fall back to getrusage (kB on Linux, bytes on macOS)
            scale = 1 if sys.platform == "darwin" else 1024
            self.peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                         + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * scale


def bench_backend(video: str, backend: str, short_side: int, clips: int, workers: int, stride: int,
                  frames_per_clip: int = T_DEFAULT) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from wtours.video.clips import ClipDataset, worker_context

    row: dict = {"backend": backend}
    try:
        ds = ClipDataset([video], frames_per_clip=frames_per_clip, stride=stride, short_side=short_side,
                         clips_per_epoch=clips, backend=backend, batch_size=1, rank=0, world_size=1)
    except UserError as e:
        row["error"] = str(e)
        return row
    # Workers persist: epoch 0 starts them (one torch import each, from the fork server: a one-off of a
    # training run, reported apart as startup_s); epoch 1, a different set of clips, is timed.
    dl = DataLoader(ds, batch_size=1, num_workers=workers, persistent_workers=workers > 0,
                    multiprocessing_context=worker_context(workers))
    delivered = 0
    with _PeakRSS() as mem:
        try:
            t_start = time.perf_counter()
            for _ in dl:
                pass
            row["startup_s"] = round(time.perf_counter() - t_start, 3)
            ds.set_epoch(1)
            ds.reset_stats()
            t0 = time.perf_counter()
            for b in dl:
                delivered += int(b["clip"].shape[0] * b["clip"].shape[1])
        except UserError as e:
            row["error"] = str(e)
            return row
        dt = time.perf_counter() - t0
    st = ds.stats()
    row.update({
        "delivered_frames": delivered,
        "seconds": round(dt, 3),
        "delivered_fps": round(delivered / dt, 2),
        "decoded_frames": st["decoded_frames"],
        "decoded_per_delivered": round(st["ratio"], 3),
        "corrupt_packets": st["corrupt_packets"],
        "peak_rss_mib": round(mem.peak / 2**20, 1),
        "clip_shape": list(ds.clip_shape),
    })
    del torch
    return row


def run_bench(video: str | None, short_side: int | None = None, backends=("pyav", "decord"), clips: int = 24,
              workers: int | None = None, stride: int | None = None) -> dict:
    from wtours.video.index import index_video

    tmp = None
    try:
        if video is None:
            tmp = tempfile.TemporaryDirectory(prefix="wtours-bench-")
            video = str(synth_4k_clip(Path(tmp.name) / "synth_4k_h264.mp4"))
            source = "synthetic 4K H.264 (textured pan, 4 s @ 30 fps, keyframe every 30)"
        else:
            source = str(video)
        idx = index_video(video)
        short_side = short_side or SHORT_SIDE_DEFAULT
        if workers is None:
            try:
                workers = len(os.sched_getaffinity(0))
            except AttributeError:
                workers = os.cpu_count() or 1
        T = T_DEFAULT
        if stride is None:
            stride = STRIDE_DEFAULT
            while stride > 1 and stride * T * 2 > idx.num_frames:
                stride //= 2  # a short video: keep at least two blocks of clips
        if (T - 1) * stride + 1 > idx.num_frames:
            raise UserError(f"video too short for {T} frames {stride} apart ({idx.num_frames} frames)", path=video)
        ceil_fps, n = ceiling_fps(video)
        rows = []
        for b in backends:
            r = bench_backend(video, b, short_side, clips, workers, stride, T)
            if "delivered_fps" in r:
                r["vs_ceiling"] = round(r["delivered_fps"] / ceil_fps, 3)
            rows.append(r)
        return {
            "video": source,
            "codec": idx.codec, "width": idx.width, "height": idx.height, "fps": idx.fps,
            "frames": idx.num_frames, "keyframe_spacing": round(idx.mean_keyframe_spacing, 2),
            "short_side": short_side, "frames_per_clip": T, "stride": stride, "clips": clips,
            "workers": workers, "cpu_cores": os.cpu_count(),
            "ceiling_fps": round(ceil_fps, 2),
            "backends": rows,
            "goal": "delivered_fps >= 0.8 x ceiling_fps and decoded_per_delivered <= 1.5",
        }
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_table(res: dict) -> str:
    lines = [
        f"video: {res['video']}  ({res['codec']} {res['width']}x{res['height']} {res['fps']:.2f} fps, "
        f"{res['frames']} frames, keyframe every {res['keyframe_spacing']})",
        f"clips: {res['clips']} x {res['frames_per_clip']} frames, stride {res['stride']}, "
        f"short side {res['short_side']}, {res['workers']} workers",
        f"ceiling (PyAV, every frame, no conversion): {res['ceiling_fps']:.1f} frames/s",
        "",
        f"{'backend':<8} {'delivered/s':>12} {'x ceiling':>10} {'decoded/delivered':>18} {'peak RSS MiB':>13}",
    ]
    for r in res["backends"]:
        if "error" in r:
            lines.append(f"{r['backend']:<8} refused: {r['error']}")
        else:
            lines.append(f"{r['backend']:<8} {r['delivered_fps']:>12.1f} {r['vs_ceiling']:>10.2f} "
                         f"{r['decoded_per_delivered']:>18.2f} {r['peak_rss_mib']:>13.0f}")
    return "\n".join(lines)


def cli_main(args) -> int:
    """``wtours bench decode [VIDEO] [--short-side] [--backends] [--clips] [--workers] [--stride] [--json FILE]``."""
    if args.clips < 1:
        raise UserError(f"--clips must be >= 1, got {args.clips}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    from wtours.video.decode import BACKENDS

    for b in args.backends:
        if b not in BACKENDS:
            raise UserError(f"unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
    if args.video is not None:
        from wtours.video.index import check_video_path

        check_video_path(args.video)
    res = run_bench(args.video, args.short_side, args.backends, args.clips, args.workers,
                    getattr(args, "stride", None))
    print(format_table(res))
    if args.json:
        from wtours.fsutil import write_json

        write_json(args.json, res)
    return 0

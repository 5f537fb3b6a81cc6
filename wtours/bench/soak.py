"""``wtours bench decode --soak MINUTES``: does the clip loader's memory stay flat over a long run?

The training loader (:class:`~wtours.video.loader.ClipLoader` over a
:class:`~wtours.video.clips.ClipDataset`, the same settings as the throughput bench) runs epoch after
epoch over one source, by default the bench's synthetic 4K tour (a looped 4K H.264 file: every epoch
decodes it again), for ``MINUTES`` of wall time. Every ``--soak-every`` seconds (default 60) a
sampler thread records the PSS of the whole loader (main process plus workers, shared pages counted
once), the RSS of the main process and of the largest worker, and the frames delivered so far.

The figure is the **slope**: a least-squares line through the PSS samples of the second half of the
run (the first half holds the start-up: the pool filling, the allocator settling), in MiB per hour,
beside the slope over every sample and the worker RSS slope. A leak shows as a slope that stays
positive however long the run (the decord reference loader grows by ~14 GB on 4K); a flat loader
gives a slope near 0 within the noise of a few MiB.

Shortened runs (``--soak 0.1 --soak-every 2``) exercise the same code in the test suite.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from wtours.errors import UserError


def tree_memory() -> dict[str, int]:
    """Memory of this process and its descendants (Linux /proc): ``pss`` of the whole tree (shared pages
    counted once; RSS where PSS is unreadable), ``main_rss``, ``worker_rss`` (the largest child), ``procs``."""
    from wtours.bench.decode import _tree_pids, proc_memory

    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    me = os.getpid()
    out = {"pss": 0, "main_rss": 0, "worker_rss": 0, "procs": 0}
    for p in _tree_pids():
        pss, rss = proc_memory(p, page)
        if rss is None:
            continue
        out["pss"] += pss if pss is not None else rss
        out["procs"] += 1
        if p == me:
            out["main_rss"] = rss
        else:
            out["worker_rss"] = max(out["worker_rss"], rss)
    return out


def slope_per_hour(t_s: list[float], values: list[float]) -> float | None:
    """Least-squares slope of ``values`` against ``t_s`` (seconds), per hour; None with < 2 distinct times."""
    t = np.asarray(t_s, dtype=np.float64)
    if t.size < 2 or np.ptp(t) <= 0:
        return None
    return float(np.polyfit(t / 3600.0, np.asarray(values, dtype=np.float64), 1)[0])


class _Sampler:
    """Records :func:`tree_memory` and the delivered frames every ``every`` seconds (and once at start)."""

    def __init__(self, every: float, delivered: list[int]) -> None:
        self.every, self.delivered = float(every), delivered
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self.t0 = 0.0

    def sample(self) -> None:
        m = tree_memory()
        self.samples.append({"t_s": round(time.perf_counter() - self.t0, 2), "frames": int(self.delivered[0]),
                             "pss_mib": round(m["pss"] / 2**20, 1), "main_rss_mib": round(m["main_rss"] / 2**20, 1),
                             "worker_rss_mib": round(m["worker_rss"] / 2**20, 1), "procs": m["procs"]})

    def _run(self) -> None:
        k = 1
        while not self._stop.wait(max(0.0, self.t0 + k * self.every - time.perf_counter())):
            self.sample()
            k += 1

    def __enter__(self) -> "_Sampler":
        self.t0 = time.perf_counter()
        self.sample()
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.sample()  # the end of the run


def check_soak_options(minutes: float, every: float) -> None:
    """One-line errors for soak option values (before any work)."""
    if not minutes > 0:
        raise UserError(f"--soak must be > 0 minutes, got {minutes:g}")
    if not every > 0:
        raise UserError(f"--soak-every must be > 0 seconds, got {every:g}")
    if every > minutes * 60:
        raise UserError(f"--soak-every {every:g} s is longer than the soak ({minutes:g} min): no sample in between")


def run_soak(video: str | None, minutes: float, every: float = 60.0, backend: str = "pyav",
             short_side: int | None = None, workers: int | None = None, stride: int | None = None, *,
             batch_size: int = 16, lanes: int | None = None, seconds: float = 64.0, gop: int = 30,
             config: str | None = "video/dora_vits16", progress: bool = True) -> dict[str, Any]:
    """The soak (see the module docstring) -> a JSON-able dict with the samples and the slopes."""
    import sys

    from wtours.bench.decode import SHORT_SIDE_DEFAULT, STRIDE_SECONDS, T_DEFAULT, steady_clips, synth_tour
    from wtours.video.clips import ClipDataset, worker_context
    from wtours.video.index import index_video
    from wtours.video.loader import ClipLoader, default_workers

    check_soak_options(minutes, every)
    if video is None:
        video = str(synth_tour(seconds=seconds, gop=gop))
        source = f"synthetic 4K H.264 tour ({seconds:g} s @ 30 fps, keyframe every {gop}), looped epoch after epoch"
    else:
        source = f"{video}, looped epoch after epoch"
    idx = index_video(video)
    if short_side is None:
        from wtours.stages.video.run import load_pretrain_config

        short_side = load_pretrain_config(config, []).data.short_side if config else SHORT_SIDE_DEFAULT
    workers = default_workers() if workers is None else workers
    T = T_DEFAULT
    if stride is None:
        stride = max(1, int(round(STRIDE_SECONDS * idx.fps)))
        while stride > 1 and stride * T * 2 > idx.num_frames:
            stride //= 2
    if (T - 1) * stride + 1 > idx.num_frames:
        raise UserError(f"video too short for {T} frames {stride} apart ({idx.num_frames} frames)", path=video)
    ds = ClipDataset([video], frames_per_clip=T, stride=stride, short_side=short_side, clips_per_epoch=batch_size,
                     backend=backend, batch_size=batch_size, lanes=lanes, rank=0, world_size=1)
    ds.clips_per_epoch = max(batch_size, steady_clips(ds, batch_size) // batch_size * batch_size)
    loader = ClipLoader(ds, batch_size, num_workers=workers, drop_last=True, pin_memory=False,
                        multiprocessing_context=worker_context(workers))
    delivered = [0]
    epochs = 0
    limit = minutes * 60.0
    if progress:
        print(f"bench decode --soak: {minutes:g} min of the {backend} loader over {source} (short side {short_side}, "
              f"{workers} workers), memory every {every:g} s", file=sys.stderr)
    try:
        with _Sampler(every, delivered) as sampler:
            t_end = sampler.t0 + limit
            done = False
            while not done:
                ds.set_epoch(epochs)
                for b in loader:
                    delivered[0] += int(b["video"].shape[0]) * T
                    if time.perf_counter() >= t_end:
                        done = True
                        break
                epochs += 1
                if progress and not done:
                    s = sampler.samples[-1]
                    print(f"  {time.perf_counter() - sampler.t0:7.0f} s: epoch {epochs}, {delivered[0]} frames, "
                          f"PSS {s['pss_mib']:.0f} MiB at the last sample", file=sys.stderr)
            wall = time.perf_counter() - sampler.t0
    finally:
        pool = loader.pool_clips
        loader.close()
    samples = sampler.samples
    half = [s for s in samples if s["t_s"] >= wall / 2]
    if len(half) < 2:
        half = samples
    res: dict[str, Any] = {
        "video": source, "codec": idx.codec, "width": idx.width, "height": idx.height, "fps": idx.fps,
        "frames": idx.num_frames, "backend": backend, "short_side": short_side, "frames_per_clip": T,
        "stride": stride, "batch_size": batch_size, "workers": workers, "cpu_cores": os.cpu_count(),
        "minutes": round(wall / 60, 2), "every_s": every, "epochs": epochs, "delivered_frames": delivered[0],
        "delivered_fps": round(delivered[0] / max(wall, 1e-9), 1),
        "pool_mib": round(pool * loader.clip_bytes / 2**20, 1),
        "pss_start_mib": samples[0]["pss_mib"], "pss_end_mib": samples[-1]["pss_mib"],
        "pss_peak_mib": max(s["pss_mib"] for s in samples),
        "worker_rss_peak_mib": max(s["worker_rss_mib"] for s in samples),
        "pss_slope_mib_per_h": _round(slope_per_hour([s["t_s"] for s in half], [s["pss_mib"] for s in half])),
        "pss_slope_all_mib_per_h": _round(slope_per_hour([s["t_s"] for s in samples],
                                                         [s["pss_mib"] for s in samples])),
        "worker_rss_slope_mib_per_h": _round(slope_per_hour([s["t_s"] for s in half],
                                                            [s["worker_rss_mib"] for s in half])),
        "slope_fit": f"least squares over the {len(half)} samples of the second half (t >= {wall / 2:.0f} s)",
        "samples": samples,
    }
    return res


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def format_soak(res: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:+.1f}"

    lines = [
        f"soak: {res['minutes']:.1f} min, {res['backend']} loader over {res['video']}",
        f"  ({res['codec']} {res['width']}x{res['height']}, short side {res['short_side']}, {res['workers']} workers "
        f"on {res['cpu_cores']} cores, batches of {res['batch_size']} x {res['frames_per_clip']} frames)",
        f"  {res['epochs']} epochs, {res['delivered_frames']} frames delivered ({res['delivered_fps']:.1f} frames/s), "
        f"pool {res['pool_mib']:.0f} MiB",
        "",
        f"{'t (s)':>8} {'frames':>9} {'PSS MiB':>9} {'main RSS':>9} {'worker RSS':>10}",
    ]
    for s in res["samples"]:
        lines.append(f"{s['t_s']:>8.0f} {s['frames']:>9} {s['pss_mib']:>9.1f} {s['main_rss_mib']:>9.1f} "
                     f"{s['worker_rss_mib']:>10.1f}")
    lines += [
        "",
        f"PSS {res['pss_start_mib']:.0f} -> {res['pss_end_mib']:.0f} MiB (peak {res['pss_peak_mib']:.0f}); slope "
        f"{f(res['pss_slope_mib_per_h'])} MiB/h ({res['slope_fit']}), {f(res['pss_slope_all_mib_per_h'])} MiB/h over "
        f"all samples; worker RSS slope {f(res['worker_rss_slope_mib_per_h'])} MiB/h",
    ]
    return "\n".join(lines)

"""``wtours bench train``: the stage-1 training step's speed, FLOPs, MFU and memory, and the loader alone.

    wtours bench train --stage video --config configs/video/dora_vits16.yaml --steps 20 --json bench-train.json

Measures, on the default device (CUDA when available, else CPU):

* loader: clips/s of ``ClipDataset`` + ``DataLoader`` (``data.num_workers``) without training;
* train step (one fixed batch already on the device, so the loader is out of the picture):
  steps/s and clips/s of the full DoRA step (GPU augmentation, teacher, tracking, student
  forward/backward, per-parameter clipping, AdamW, EMA, centre), bf16 autocast on CUDA;
* FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions, SDPA),
  achieved TFLOP/s and MFU against the GPU's dense bf16 peak (H100 SXM / H200 989, H100 PCIe 756,
  A100 312 TFLOP/s; "n/a" on CPU or an unknown GPU);
* peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS).

Without ``--config`` it uses ``configs/video/dora_vits16.yaml`` on a GPU and ``configs/video/tiny.yaml``
on CPU; without ``videos`` in the config it benchmarks on a synthetic walking tour (cached in
``runs/bench/data/synth``).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12))


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by name (None when unknown)."""
    name = device_name.upper().replace("-", " ")
    for key, peak in PEAK_BF16:
        k = key.upper()
        if k == "H100 PCIE":
            if "H100" in name and "PCIE" in name:
                return peak
            continue
        if k in name:
            return peak
    return None


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_loader(cfg: Any, videos: list[str], batches: int) -> dict[str, float]:
    """Clips/s of the CPU loader alone (first batch excluded: worker start-up)."""
    from torch.utils.data import DataLoader

    from wtours.train.video_data import make_clip_dataset
    from wtours.video.clips import worker_context

    ds = make_clip_dataset(cfg, videos)
    ds.clips_per_epoch = max(ds.clips_per_epoch, (batches + 1) * cfg.data.batch_size)
    w = cfg.data.num_workers
    dl = DataLoader(ds, batch_size=cfg.data.batch_size, num_workers=w, drop_last=True,
                    prefetch_factor=cfg.data.prefetch_factor if w > 0 else None,
                    multiprocessing_context=worker_context(w))
    it = iter(dl)
    next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            break
        n += b["clip"].shape[0]
    dt = time.perf_counter() - t0
    st = ds.stats()
    return {"loader_clips_per_s": n / dt if dt > 0 else float("nan"), "loader_clips": n,
            "loader_frames_per_s": n * cfg.data.frames_per_clip / dt if dt > 0 else float("nan"),
            "decode_ratio": st.get("ratio", float("nan"))}


def bench_step(cfg: Any, clips: Any, steps: int) -> dict[str, Any]:
    """Time the full DoRA optimizer step on a fixed batch ``clips`` (uint8 on the target device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from wtours.train.video_module import DoRAModule, clip_per_parameter_

    device = clips.device
    module = DoRAModule(cfg).to(device)
    sched = module.ensure_schedules(1)
    opt = module.configure_optimizers()
    if cfg.trainer.compile:
        module.configure_model()
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> torch.Tensor:
        with amp:
            loss, _ = module.forward_step(clips, sched.at(0))
        loss.backward()
        clip_per_parameter_(module.trainable_parameters(), cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        module.after_optimizer_step(sched.at(0))
        return loss.detach()

    for _ in range(2):  # warm-up (allocations, cuDNN/compile)
        step()
    _sync(device)
    with FlopCounterMode(display=False) as fc:
        step()
    flops = float(fc.get_total_flops())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    dt = time.perf_counter() - t0
    sps = steps / dt
    b = clips.shape[0]
    out: dict[str, Any] = {"steps_per_s": sps, "clips_per_s": sps * b, "frames_per_s": sps * b * clips.shape[1],
                           "flops_per_step": flops, "achieved_tflops": flops * sps / 1e12, "final_loss": float(loss)}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        out["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    return out


def cli_main(args: Any) -> int:
    import torch

    from wtours.fsutil import write_json
    from wtours.train.pretrain import load_pretrain_config, synth_videos

    on_gpu = torch.cuda.is_available()
    config = args.config or ("video/dora_vits16" if on_gpu else "video/tiny")
    cfg = load_pretrain_config(config, args.overrides)
    if args.steps < 1:
        from wtours.errors import UserError

        raise UserError(f"--steps must be >= 1, got {args.steps}")
    videos = list(cfg.videos) or synth_videos(cfg, Path("runs/bench"), progress=True)
    device = torch.device("cuda" if on_gpu else "cpu")
    dev_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"bench train: {cfg.model.arch}, batch {cfg.data.batch_size} clips x {cfg.data.frames_per_clip} frames, "
          f"{cfg.crops.local_number} local crops, {cfg.tracking.objects} objects on {dev_name}", file=sys.stderr)

    loader = bench_loader(cfg, videos, batches=max(2, min(args.steps, 10)))
    from wtours.train.video_data import make_clip_dataset

    ds = make_clip_dataset(cfg, videos)
    clips = torch.stack([item["clip"] for _, item in zip(range(cfg.data.batch_size), iter(ds))]).to(device)
    res = bench_step(cfg, clips, args.steps)
    peak = peak_flops(dev_name) if on_gpu else None
    res.update(loader)
    res.update({"device": dev_name, "config": str(config), "arch": cfg.model.arch, "batch_size": cfg.data.batch_size,
                "frames_per_clip": cfg.data.frames_per_clip, "steps": args.steps,
                "precision": "bf16-mixed" if on_gpu else "fp32",
                "peak_tflops": peak / 1e12 if peak else None,
                "mfu": res["achieved_tflops"] * 1e12 / peak if peak else None})
    rows = [("device", dev_name), ("precision", res["precision"]),
            ("steps/s", f"{res['steps_per_s']:.3f}"), ("clips/s (train step)", f"{res['clips_per_s']:.2f}"),
            ("frames/s (train step)", f"{res['frames_per_s']:.1f}"),
            ("GFLOP per step", f"{res['flops_per_step'] / 1e9:.1f}"),
            ("achieved TFLOP/s", f"{res['achieved_tflops']:.3f}"),
            ("MFU", f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a"),
            ("peak memory (GiB)", f"{res['peak_memory_gib']:.2f}" + ("" if on_gpu else " (process RSS)")),
            ("loader clips/s", f"{res['loader_clips_per_s']:.2f} ({cfg.data.num_workers} workers)"),
            ("loader decode ratio", f"{res['decode_ratio']:.2f}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps({"usage": "wtours bench train --stage video [--config FILE] [--steps N] [--json FILE]"}))

"""``wtours bench train``: training step throughput, MFU, memory and loader speed (:mod:`wtours.bench.train`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from wtours.bench import train as lib


def cli_main(args: Any) -> int:
    import torch

    from wtours.fsutil import write_json
    from wtours.stages.video.run import load_pretrain_config, synth_videos

    on_gpu = torch.cuda.is_available()
    config = args.config or ("video/dora_vits16" if on_gpu else "video/tiny")
    cfg = load_pretrain_config(config, args.overrides)
    if args.steps < 1:
        from wtours.errors import UserError

        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.json:
        from wtours.fsutil import check_output_file

        check_output_file(args.json, "--json")
    videos = list(cfg.videos) or synth_videos(cfg, Path("runs/bench"), progress=True)
    from wtours.stages.video.schedules import resolve_clips_per_epoch

    resolve_clips_per_epoch(cfg, videos)  # data.clips_per_epoch: frames -> a number, as wtours pretrain does
    device = torch.device("cuda" if on_gpu else "cpu")
    dev_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"bench train: {cfg.model.arch}, batch {cfg.data.batch_size} clips x {cfg.data.frames_per_clip} frames, "
          f"{cfg.crops.local_number} local crops, {cfg.tracking.objects} objects on {dev_name}", file=sys.stderr)

    loader = lib.bench_loader(cfg, videos, batches=max(2, min(args.steps, 10)))
    from wtours.stages.video.data import make_clip_dataset

    ds = make_clip_dataset(cfg, videos)
    clips = torch.stack([item["clip"] for _, item in zip(range(cfg.data.batch_size), iter(ds))]).to(device)
    res, _ = lib.bench_step(cfg, clips, args.steps)
    peak = lib.peak_flops(dev_name) if on_gpu else None
    res.update(loader)
    res.update({"device": dev_name, "config": str(config), "arch": cfg.model.arch, "batch_size": cfg.data.batch_size,
                "frames_per_clip": cfg.data.frames_per_clip, "steps": args.steps,
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

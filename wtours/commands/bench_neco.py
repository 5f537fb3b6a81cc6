"""``wtours bench neco``: the NeCo step and loss benchmarks (:mod:`wtours.bench.neco`)."""

from __future__ import annotations

import sys
from typing import Any

from wtours.bench import neco as lib


def cli_main(args: Any) -> int:
    import torch

    from wtours.errors import UserError
    from wtours.fsutil import write_json
    from wtours.stages.neco.run import load_neco_config

    on_gpu = torch.cuda.is_available()
    config = args.config or ("neco/neco_vits16" if on_gpu else "neco/tiny")
    overrides = list(args.overrides)
    if not on_gpu and not args.config:
        overrides = ["loss.roi_size=7", *overrides]  # NeCo's 49 references: the sorter's real size
    cfg = load_neco_config(config, overrides)  # validates the overrides before any variant runs
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.batch is not None and args.batch < 1:  # 0 is not "the default"
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    batch = args.batch if args.batch is not None else (cfg.data.batch_size if on_gpu or args.config else 4)
    if batch < 1:
        raise UserError(f"data.batch_size must be >= 1, got {batch}")
    if args.json:
        from wtours.fsutil import check_output_file

        check_output_file(args.json, "--json")
    arch = args.arch or ("vit_small_patch16_224" if on_gpu else "vit_nano_patch8_64")
    from wtours.models.weights import vit_arch_problem

    problem = vit_arch_problem(arch)
    if problem:
        raise UserError(f"--arch: {problem}")
    dev_name = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    print(f"bench neco: {arch}, batch {batch} images, ROI {cfg.loss.roi_size}x{cfg.loss.roi_size}, chunk_rows "
          f"{cfg.loss.chunk_rows}, on {dev_name}", file=sys.stderr)
    results = []
    for sorter in args.sorters:
        for impl in lib.VARIANTS[sorter]:
            spec = {"sorter": sorter, "impl": impl, "config": config, "overrides": overrides, "arch": arch,
                    "batch": batch, "steps": args.steps, "step": not args.no_step,
                    "threads": cfg.trainer.cpu_threads}
            print(f"  {sorter} / {impl} ...", file=sys.stderr)
            results.append(lib.run_variant(spec) if on_gpu else lib._in_subprocess(spec))
    table = lib.format_table(results)
    print(f"device: {dev_name}; {arch}; batch {batch}; precision {'bf16 autocast' if on_gpu else 'fp32'}")
    print(table)
    if args.json:
        write_json(args.json, {"device": dev_name, "arch": arch, "batch": batch, "config": config,
                               "overrides": overrides, "results": results})
        print(f"wrote {args.json}", file=sys.stderr)
    return 0

"""``wtours bench decode``: the loader's throughput table (:mod:`wtours.bench.decode`), or with ``--soak``
its memory over a long run (:mod:`wtours.bench.soak`)."""

from __future__ import annotations

from wtours.bench import decode
from wtours.errors import UserError


def cli_main(args) -> int:
    """``wtours bench decode [VIDEO] [--short-side] [--backends] [--clips] [--workers] [--stride] [--batch-size]
    [--lanes] [--proxy] [--gpu] [--mfu] [--config] [--gflop-per-frame] [--seconds] [--gop] [--json FILE]``."""
    if args.clips is not None and args.clips < 1:
        raise UserError(f"--clips must be >= 1, got {args.clips}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    bs = getattr(args, "batch_size", decode.BATCH_DEFAULT)
    if bs < 1:
        raise UserError(f"--batch-size must be >= 1, got {bs}")
    for name, low in (("lanes", 1), ("gop", 1), ("repeat", 1)):
        val = getattr(args, name, None)
        if val is not None and val < low:
            raise UserError(f"--{name} must be >= {low}, got {val}")
    if not getattr(args, "seconds", 1.0) > 0:
        raise UserError(f"--seconds must be > 0, got {args.seconds}")
    mfu = getattr(args, "mfu", decode.MFU_DEFAULT)
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    for name, low in (("short_side", 2), ("stride", 1)):
        val = getattr(args, name, None)
        if val is not None and val < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {val}")
    gflop = getattr(args, "gflop_per_frame", None)
    if gflop is not None and not gflop > 0:
        raise UserError(f"--gflop-per-frame must be > 0, got {gflop}")
    if args.json:
        from wtours.fsutil import check_output_file

        check_output_file(args.json, "--json")
    from wtours.video.decode import BACKENDS

    for b in args.backends:
        if b not in BACKENDS:
            raise UserError(f"unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
    if args.video is not None:
        from wtours.video.index import check_video_path

        check_video_path(args.video)
    if getattr(args, "soak", None) is not None:
        return _soak_main(args, bs)
    gpu = getattr(args, "gpu", decode.GPU_DEFAULT)
    res = decode.run_bench(args.video, args.short_side, args.backends, args.clips, args.workers,
                    getattr(args, "stride", None), batch_size=bs, lanes=getattr(args, "lanes", None),
                    proxy=getattr(args, "proxy", False), gpu=None if gpu in (None, "", "none") else gpu, mfu=mfu,
                    config=getattr(args, "config", decode.CONFIG_DEFAULT), gflop=getattr(args, "gflop_per_frame", None),
                    seconds=getattr(args, "seconds", 64.0), gop=getattr(args, "gop", 30),
                    repeat=getattr(args, "repeat", 1))
    print(decode.format_table(res))
    if args.json:
        from wtours.fsutil import write_json

        write_json(args.json, res)
    return 0


def _soak_main(args, batch_size: int) -> int:
    """``--soak MINUTES``: :mod:`wtours.bench.soak` (memory over a long run) instead of the throughput table."""
    from wtours.bench.soak import check_soak_options, format_soak, run_soak

    check_soak_options(args.soak, args.soak_every)
    res = run_soak(args.video, args.soak, args.soak_every, backend=args.backends[0], short_side=args.short_side,
                   workers=args.workers, stride=getattr(args, "stride", None), batch_size=batch_size,
                   lanes=getattr(args, "lanes", None), seconds=getattr(args, "seconds", 64.0),
                   gop=getattr(args, "gop", 30), config=getattr(args, "config", decode.CONFIG_DEFAULT))
    print(format_soak(res))
    if args.json:
        from wtours.fsutil import write_json

        write_json(args.json, res)
    return 0

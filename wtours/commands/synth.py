"""``wtours synth``: write a synthetic walking tour (:mod:`wtours.video.synth`)."""

from __future__ import annotations

from wtours.video import synth as lib


def cli_main(args) -> int:
    res = lib.synthesize(args.out, width=args.width, height=args.height, fps=args.fps, seconds=args.seconds,
                     codec=args.codec, gop=args.gop, sequences=args.sequences, seq_frames=args.seq_frames,
                     objects=args.objects, seed=args.seed, progress=True)
    for path in (res.video, res.davis_root, res.ytvos_root, res.meta):
        if path.exists():  # --sequences 0 writes no datasets
            print(path)
    return 0

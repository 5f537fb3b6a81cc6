"""``wtours prepare VIDEO``: transcode a video to a training proxy (:mod:`wtours.video.prepare`)."""

from __future__ import annotations

from wtours.video import prepare as lib
from wtours.video.index import index_video


def cli_main(args) -> int:
    """``wtours prepare VIDEO --short-side N [--out FILE] [--gop] [--crf] [--preset] [--fps] [--quiet]``."""
    out = lib.prepare_video(args.video, short_side=args.short_side, out=args.out, gop=args.gop, crf=args.crf,
                        preset=args.preset, fps=args.fps, progress=not args.quiet)
    idx = index_video(out)
    print(f"{out}: {idx.width}x{idx.height} h264, {idx.fps:.3f} fps, {idx.num_frames} frames, "
          f"{len(idx.keyframes)} keyframes (every {idx.mean_keyframe_spacing:.0f} frames)")
    return 0

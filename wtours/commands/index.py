"""``wtours index VIDEO``: probe a video and build its keyframe index (:mod:`wtours.video.index`)."""

from __future__ import annotations

import json
import sys

from wtours.video import index as lib


def cli_main(args) -> int:
    """``wtours index VIDEO... [--json] [--rebuild]``."""
    results = []
    for v in args.videos:
        idx = lib.index_video(v, rebuild=args.rebuild)
        results.append(idx)
    if args.json:
        out = [i.summary() for i in results]
        json.dump(out[0] if len(out) == 1 else out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print("\n".join(lib.format_summary(i) for i in results))
    return 0

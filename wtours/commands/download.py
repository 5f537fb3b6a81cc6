"""``wtours download URL``: fetch a video with yt-dlp (:mod:`wtours.video.download`)."""

from __future__ import annotations

from wtours.video import download as lib


def cli_main(args) -> int:
    path = lib.download(args.url, args.out, max_height=args.max_height, allow_av1=args.allow_av1,
                    format_spec=args.format_spec, progress=not args.quiet)
    print(path)
    return 0

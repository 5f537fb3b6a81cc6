"""``wtours download``: fetch the best video-only stream of a URL with yt-dlp.

Self-supervised pretraining needs no audio, so we take a **video-only** stream: no audio/video
merge, hence no ``ffmpeg`` binary needed. Selection (see ``ecosystem.md`` §2):

- highest resolution up to ``max_height`` first (yt-dlp's ``res`` sort);
- unless ``allow_av1``: any non-AV1 stream before any AV1 one, because Hopper NVDEC cannot decode
  AV1 (a *filter* branch, not a ``format_sort`` entry: in ``format_sort`` ``res`` outranks the codec,
  so ``vcodec:vp9`` alone would still pick a higher-resolution AV1 stream); AV1 remains the fallback
  for sites that only offer AV1;
- SDR before HDR at the same resolution (10-bit HDR needs tone mapping to look right in training);
- then yt-dlp's own order (fps, codec: VP9 > H.265 > H.264, bitrate, ...).

The fallback chain ``bv -> bv* -> b`` (video-only, then any stream with video, then the best
progressive format) makes sites that only offer muxed "best" formats work; ``[height<=?N]`` lets
formats of unknown height (direct links) through. A raw ``format_spec`` replaces all of this.

A partial download resumes from its ``.part`` file (``continuedl``) where the server supports byte
ranges; the info JSON is written beside the file; the output name is
``%(title).80B [%(id)s].%(ext)s``. ``file://`` URLs are accepted (``enable_file_urls``) only when
the given URL itself is one, so a web page cannot make yt-dlp read local files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable

from wtours.errors import UserError
from wtours.fsutil import ensure_dir

OUTTMPL = "%(title).80B [%(id)s].%(ext)s"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def format_selector(max_height: int = 2160, allow_av1: bool = False, format_spec: str | None = None
                    ) -> tuple[str, list[str]]:
    """The yt-dlp ``format`` string and ``format_sort`` list for these options.

    >>> format_selector(1080)[0]
    'bv[height<=?1080][vcodec!^=?av01][vcodec!^=?av1]/bv[height<=?1080]/bv*[height<=?1080]/b[height<=?1080]'
    """
    if format_spec:
        return format_spec, []
    if not isinstance(max_height, int) or max_height <= 0:
        raise UserError(f"--max-height must be a positive number of pixels (got {max_height})")
    h = f"[height<=?{max_height}]"
    chain = [f"bv{h}", f"bv*{h}", f"b{h}"]
    if not allow_av1:
        chain.insert(0, f"bv{h}[vcodec!^=?av01][vcodec!^=?av1]")
    return "/".join(chain), ["res", "hdr:sdr"]


def _error_line(e: BaseException) -> str:
    """First line of a yt-dlp error, without its 'ERROR: ' prefix and colours."""
    msg = _ANSI.sub("", str(e)).strip() or type(e).__name__
    msg = msg.splitlines()[0]
    msg = re.sub(r"^ERROR:\s*", "", msg)
    msg = re.sub(r"\s*\(caused by \w+\(.*\)\)\s*$", "", msg)  # the same reason again, as a repr
    if "Requested format is not available" in msg:
        msg = "no format matches the selection (check --max-height / --format; " + msg + ")"
    return msg


class _Quiet:
    """A yt-dlp logger: drops its chatter (errors come back as exceptions); warnings to stderr."""

    def __init__(self, show_warnings: bool):
        self.show_warnings = show_warnings

    def debug(self, msg: str) -> None:
        pass

    info = debug

    def warning(self, msg: str) -> None:
        if self.show_warnings and "Retrying (" not in msg and "Giving up after" not in msg:
            print(f"wtours download: {_ANSI.sub('', msg)}", file=sys.stderr)

    def error(self, msg: str) -> None:
        pass


class _ProgressBar:
    """A tqdm bar (bytes, on stderr) driven by yt-dlp's ``progress_hooks``."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, d: dict[str, Any]) -> None:
        from tqdm import tqdm

        total = d.get("total_bytes") or d.get("total_bytes_estimate")
        done = d.get("downloaded_bytes") or 0
        if self.bar is None and d.get("status") == "downloading":
            name = Path(d.get("filename") or "video").name
            self.bar = tqdm(total=total, initial=0, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=name[:40], file=sys.stderr, dynamic_ncols=True, leave=False)
        if self.bar is None:
            return
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.update(max(0, done - self.bar.n))
        if d.get("status") in ("finished", "error"):
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def build_params(out_dir: str | Path, max_height: int = 2160, allow_av1: bool = False,
                 format_spec: str | None = None, progress: bool = True, file_urls: bool = False,
                 hooks: list[Callable[[dict], None]] | None = None) -> dict[str, Any]:
    """The ``YoutubeDL`` parameters :func:`download` uses (exposed for tests and scripts)."""
    fmt, sort = format_selector(max_height, allow_av1, format_spec)
    params: dict[str, Any] = {
        "format": fmt,
        "outtmpl": {"default": OUTTMPL},
        "paths": {"home": str(out_dir)},
        "restrictfilenames": True,
        "writeinfojson": True,
        "continuedl": True,
        "nopart": False,
        "noplaylist": True,
        "playlist_items": "1",  # guard: a URL that redirects to a playlist fetches one video
        "quiet": True,
        "noprogress": True,  # our own tqdm bar instead
        "logger": _Quiet(show_warnings=progress),
        "progress_hooks": list(hooks or []),
        "retries": 10,
        "fragment_retries": 10,
        "enable_file_urls": bool(file_urls),
    }
    if sort:
        params["format_sort"] = sort
    return params


def choose_format(info: dict[str, Any], max_height: int = 2160, allow_av1: bool = False,
                  format_spec: str | None = None) -> dict[str, Any]:
    """Apply :func:`download`'s selection to an info dict without downloading anything.

    ``info`` needs ``id``, ``title`` and ``formats`` (each with ``format_id``, ``url``, ``ext``,
    ``vcodec``, ``acodec``, ``height``). Returns the processed info dict: the chosen format's fields
    (``format_id``, ``vcodec``, ``height``, ...) are at its top level.
    """
    import yt_dlp
    from yt_dlp.utils import YoutubeDLError

    info = {"extractor": "wtours", "extractor_key": "Wtours", "webpage_url": "https://example.invalid/",
            **info, "formats": [dict(f) for f in info.get("formats", [])]}
    params = build_params(".", max_height, allow_av1, format_spec, progress=False)
    params.update(simulate=True, writeinfojson=False)
    try:
        with yt_dlp.YoutubeDL(params) as ydl:
            return ydl.process_ie_result(info, download=False)
    except YoutubeDLError as e:
        raise UserError(_error_line(e)) from None


def download(url: str, out_dir: str | Path = "videos", max_height: int = 2160, allow_av1: bool = False,
             format_spec: str | None = None, progress: bool = True) -> Path:
    """Download ``url``'s best video-only stream into ``out_dir``; return the file's path.

    Re-running continues a partial download (``.part``) or finds the finished file. Every yt-dlp
    failure (unsupported URL, no network, no matching format, ...) becomes a one-line UserError.
    """
    import yt_dlp
    from yt_dlp.utils import YoutubeDLError

    url = url.strip()
    if not url:
        raise UserError("empty URL")
    out = ensure_dir(out_dir)
    bar = _ProgressBar() if progress else None
    params = build_params(out, max_height, allow_av1, format_spec, progress,
                          file_urls=url.lower().startswith("file:"), hooks=[bar] if bar else None)
    try:
        with yt_dlp.YoutubeDL(params) as ydl:
            ie_result = ydl.extract_info(url, download=False, process=False)
            if ie_result and ie_result.get("_type") in ("playlist", "multi_video"):
                n = len(list(ie_result.get("entries") or []))
                raise UserError(f"{url}: is a playlist ({n} videos); pass the URL of one video")
            info = ydl.process_ie_result(ie_result, download=True) if ie_result else None
    except YoutubeDLError as e:
        raise UserError(_error_line(e)) from None
    finally:
        if bar is not None:
            bar.close()
    if not info:
        raise UserError(f"{url}: yt-dlp returned nothing to download")
    if info.get("_type") == "playlist":  # a redirect that resolved to a playlist: playlist_items=1
        entries = [e for e in info.get("entries") or [] if e]
        if not entries:
            raise UserError(f"{url}: playlist without videos")
        info = entries[0]
    downloads = info.get("requested_downloads") or []
    path = downloads[0].get("filepath") if downloads else info.get("filepath") or info.get("_filename")
    if not path or not Path(path).is_file():
        raise UserError(f"{url}: yt-dlp finished but no file was written")
    return Path(path)

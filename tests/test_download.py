"""wtours.video.download: format selection on made-up format lists, file:// and local HTTP downloads,
resume of a partial download, and one-line errors. All offline."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pytest

from wtours.cli import main
from wtours.errors import UserError
from wtours.video.download import _ProgressBar, build_params, choose_format, download, format_selector


def _fmt(fid, vcodec, height, acodec="none", ext="mp4", dynamic_range=None):
    f = {"format_id": fid, "ext": ext, "vcodec": vcodec, "acodec": acodec, "height": height,
         "width": height * 16 // 9 if height else None, "url": f"https://example.invalid/{fid}", "protocol": "https"}
    if dynamic_range:
        f["dynamic_range"] = dynamic_range
    return f


YOUTUBE_LIKE = [
    _fmt("401", "av01.0.12M.08", 2160),
    _fmt("313", "vp9", 2160),
    _fmt("137", "avc1.640028", 1080),
    _fmt("140", "none", None, acodec="mp4a.40.2", ext="m4a"),
]


def _pick(formats, **kw) -> str:
    return choose_format({"id": "abc", "title": "t", "formats": formats}, **kw)["format_id"]


# ---------------------------------------------------------------------------------------------- selection


def test_default_prefers_vp9_over_av1():
    assert _pick(YOUTUBE_LIKE) == "313"


def test_allow_av1_uses_yt_dlp_preference():
    # yt-dlp ranks AV1 above VP9 at equal resolution
    assert _pick(YOUTUBE_LIKE, allow_av1=True) == "401"


def test_max_height():
    assert _pick(YOUTUBE_LIKE, max_height=1080) == "137"
    assert _pick(YOUTUBE_LIKE, max_height=1440) == "137"


def test_non_av1_beats_higher_resolution_av1():
    # res outranks codec in format_sort: the AV1 exclusion must be a filter branch
    assert _pick([_fmt("401", "av01.0.12M.08", 2160), _fmt("137", "avc1.640028", 1080)]) == "137"


def test_only_av1_still_works():
    only = [_fmt("401", "av01.0.12M.08", 2160), _fmt("399", "av01.0.08M.08", 1080), YOUTUBE_LIKE[3]]
    assert _pick(only) == "401"
    assert _pick(only, max_height=1080) == "399"


def test_progressive_only_site():
    muxed = [_fmt("18", "avc1.42001E", 360, acodec="mp4a.40.2"), _fmt("22", "avc1.64001F", 720, acodec="mp4a.40.2")]
    assert _pick(muxed) == "22"
    assert _pick(muxed, max_height=480) == "18"


def test_unknown_height_passes_the_height_filter():
    assert _pick([{"format_id": "direct", "url": "https://example.invalid/v.mp4", "ext": "mp4"}]) == "direct"


def test_sdr_before_hdr_at_equal_resolution():
    hdr = _fmt("337", "vp09.02.51.10.01.09.16.09.00", 2160, dynamic_range="HDR10")
    assert _pick([hdr, *YOUTUBE_LIKE]) == "313"


def test_raw_format_overrides():
    assert _pick(YOUTUBE_LIKE, format_spec="137") == "137"
    assert _pick(YOUTUBE_LIKE, format_spec="bv*[vcodec^=av01]", max_height=144) == "401"
    assert format_selector(720, format_spec="18") == ("18", [])


def test_no_matching_format():
    with pytest.raises(UserError, match="no format matches"):
        _pick(YOUTUBE_LIKE, max_height=144)
    with pytest.raises(UserError, match="no format matches"):
        _pick(YOUTUBE_LIKE, format_spec="999")


def test_selector_shape():
    fmt, sort = format_selector(1080)
    assert fmt.split("/")[0] == "bv[height<=?1080][vcodec!^=?av01][vcodec!^=?av1]"
    assert fmt.split("/")[1:] == ["bv[height<=?1080]", "bv*[height<=?1080]", "b[height<=?1080]"]
    assert "av01" not in format_selector(1080, allow_av1=True)[0]
    assert sort[0] == "res"
    with pytest.raises(UserError, match="max-height"):
        format_selector(0)


def test_file_urls_only_for_file_url():
    assert build_params("x")["enable_file_urls"] is False
    p = build_params("x", file_urls=True)
    assert p["enable_file_urls"] is True and p["writeinfojson"] and p["continuedl"] and p["restrictfilenames"]
    assert p["outtmpl"]["default"] == "%(title).80B [%(id)s].%(ext)s"


# ---------------------------------------------------------------------------------------------- downloads


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A small real H.264 MP4 (noise frames, so it does not compress to nothing: ~50 KB)."""
    path = tmp_path_factory.mktemp("src") / "walk clip.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for _ in range(30):
            for pkt in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
                                                           format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode(None):
            c.mux(pkt)
    return path


def test_file_url_download(source, tmp_path):
    out = download(source.as_uri(), tmp_path / "videos", progress=False)
    assert out.parent == tmp_path / "videos"
    assert out.name == "walk_clip [walk_clip].mp4"
    assert out.read_bytes() == source.read_bytes()
    info = json.loads(out.with_suffix(".info.json").read_text())
    assert info["id"] == "walk clip" and info["format_id"] and info["webpage_url"] == source.as_uri()
    assert not list(out.parent.glob("*.part"))
    # a second run finds the finished file
    assert download(source.as_uri(), tmp_path / "videos", progress=False) == out


def test_cli_prints_path(source, tmp_path, capsys):
    rc = main(["download", source.as_uri(), "--out", str(tmp_path), "--quiet"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.out.strip() == str(tmp_path / "walk_clip [walk_clip].mp4") and cap.err == ""


def test_progress_bar_follows_hooks(source, tmp_path, capsys):
    bar = _ProgressBar()
    seen = []
    bar_hook = bar.__call__

    def hook(d):
        bar_hook(d)
        if bar.bar is not None:
            seen.append(bar.bar.n)

    n = source.stat().st_size
    for done in (1024, 4096, n):
        hook({"status": "downloading", "downloaded_bytes": done, "total_bytes": n, "filename": "v.mp4"})
    assert seen == [1024, 4096, n]
    hook({"status": "finished", "downloaded_bytes": n, "total_bytes": n})
    assert bar.bar is None
    download(source.as_uri(), tmp_path, progress=True)
    assert "walk_clip" in capsys.readouterr().err  # the tqdm bar went to stderr


class _RangeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, data: bytes):
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.data = data
        self.ranges: list[str | None] = []


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves one file with byte-range support (http.server's own handler has none)."""

    def do_HEAD(self):  # noqa: N802
        self._reply(body=False)

    def do_GET(self):  # noqa: N802
        self._reply(body=True)

    def _reply(self, body: bool):
        data = self.server.data
        rng = self.headers.get("Range")
        self.server.ranges.append(rng)
        start, end = 0, len(data) - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m:
            start, end = int(m[1]), min(int(m[2]) if m[2] else end, end)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if body:
            self.wfile.write(data[start:end + 1])

    def log_message(self, *a):
        pass


@pytest.fixture()
def http_source(source, monkeypatch):
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    srv = _RangeServer(source.read_bytes())
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/walk.mp4"
    srv.shutdown()
    srv.server_close()


def test_resume_continues_partial_download(http_source, source, tmp_path):
    srv, url = http_source
    data = source.read_bytes()
    out = download(url, tmp_path, progress=False)
    assert out.read_bytes() == data
    half = len(data) // 2
    # 1) a genuine first half: the result equals the source
    out.unlink()
    Path(f"{out}.part").write_bytes(data[:half])
    srv.ranges.clear()
    assert download(url, tmp_path, progress=False) == out
    assert out.read_bytes() == data
    assert f"bytes={half}-" in srv.ranges
    # 2) a marked first half (zeros): kept as is, so the download was continued, not restarted
    out.unlink()
    Path(f"{out}.part").write_bytes(bytes(half))
    download(url, tmp_path, progress=False)
    got = out.read_bytes()
    assert got[:half] == bytes(half) and got[half:] == data[half:]


# ---------------------------------------------------------------------------------------------- errors


def _cli_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cli_unsupported_url(tmp_path, capsys):
    assert "not a valid URL" in _cli_error(capsys, ["download", "not a url", "--out", str(tmp_path)])


def test_cli_missing_file(tmp_path, capsys):
    err = _cli_error(capsys, ["download", (tmp_path / "nope.mp4").as_uri(), "--out", str(tmp_path), "--quiet"])
    assert "No such file" in err


def test_cli_unwritable_out(source, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _cli_error(capsys, ["download", source.as_uri(), "--out", str(blocker / "videos")])
    assert str(blocker / "videos") in err


def test_cli_bad_max_height(source, tmp_path, capsys):
    assert "max-height" in _cli_error(capsys, ["download", source.as_uri(), "--out", str(tmp_path),
                                               "--max-height", "-5"])


def test_cli_no_matching_format(source, tmp_path, capsys):
    err = _cli_error(capsys, ["download", source.as_uri(), "--out", str(tmp_path), "--format", "999", "--quiet"])
    assert "no format matches" in err

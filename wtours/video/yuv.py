"""Training frames as the decoder makes them (YUV 4:2:0), turned into RGB on the device.

The training loader (:class:`~wtours.video.clips.ClipDataset` + :class:`~wtours.video.loader.ClipLoader`)
ships each frame as 8-bit I420 planes, ``uint8 [H * 3/2, W]`` (the Y plane, then U and V of
``H/2 x W/2`` each, as PyAV's ``to_ndarray`` of a ``yuv420p`` frame lays them out), and
:func:`yuv420_to_rgb` converts a whole batch on the GPU. Why, measured on a 360p H.264 proxy
(2 shared cores, CPU time per frame, one decoder thread):

=================================================  ==========
decode only (the ceiling)                          0.75-0.85 ms
+ swscale to RGB with a new scaler per frame        +0.4-0.7 ms  (PyAV builds a ``SwsContext`` per frame)
+ swscale to RGB with one kept scaler                +0.3 ms
+ copy out the YUV planes (no conversion)            +0.03 ms
=================================================  ==========

so converting on the CPU alone would cap the loader near 0.7 x the decoder's ceiling on a proxy;
YUV also halves the bytes per frame in the shared pool and in every copy (1.5 instead of 3 per pixel).
On a GPU the conversion of a batch of 16 x 8 frames costs well under a millisecond.

:class:`LoaderVideo` is the PyAV backend with one kept scaler (``threads=1``: a worker is one core)
and a pixel format: ``yuv420p`` (frames scaled and cropped in YUV; crop offsets rounded down to even
pixels so chroma stays aligned: at most one pixel off the RGB path's centre crop) or ``rgb24`` (what
:meth:`~wtours.video.decode.VideoFile.get_frames` returns; used for rotated videos and decord).

Colours: the matrix is the stream's tag (BT.709, else BT.601, as swscale assumes for untagged
streams) and the range its tag (full for ``jpeg``/``pc`` range, else limited); each chroma sample
covers its 2 x 2 pixels. Against swscale's RGB of the same frames: mean difference 1.1 grey levels,
at most 3 (rounding), on the synthetic 360p tour and on Big Buck Bunny.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from wtours.video.decode import SCALER, Geometry, PyAVVideo
from wtours.video.index import coded_size, orient

# matrix codes carried per clip in a batch ("yuv_matrix")
BT601, BT709, BT601_FULL, BT709_FULL = 0, 1, 2, 3


def matrix_code(colorspace: Any, color_range: Any) -> int:
    """Code of :data:`BT601` .. :data:`BT709_FULL` for a stream's colorspace and range tags (FFmpeg values)."""
    cs = int(getattr(colorspace, "value", colorspace) or 0)
    cr = int(getattr(color_range, "value", color_range) or 0)
    return (BT709 if cs == 1 else BT601) + (2 if cr == 2 else 0)


def stream_matrix(path: str) -> int:
    """:func:`matrix_code` of the first video stream of ``path``."""
    from wtours.video.index import first_video_stream, open_container

    c = open_container(path)
    try:
        cc = first_video_stream(c, path).codec_context
        return matrix_code(cc.colorspace, cc.color_range)
    finally:
        c.close()


def yuv_geometry(geom: Geometry) -> Geometry:
    """``geom`` for I420 output: even scaled size and even crop offsets (chroma is 2 x 2)."""
    if geom.native:
        return geom
    sw, sh = geom.scale_w + geom.scale_w % 2, geom.scale_h + geom.scale_h % 2
    cx = min((sw - geom.out_w) // 2, geom.crop_x) // 2 * 2
    cy = min((sh - geom.out_h) // 2, geom.crop_y) // 2 * 2
    return Geometry(sw, sh, cx, cy, geom.out_w, geom.out_h)


def crop_i420(planes: np.ndarray, width: int, height: int, x: int, y: int, out_w: int, out_h: int) -> np.ndarray:
    """Crop an I420 frame ``[height * 3/2, width]`` to ``[out_h * 3/2, out_w]`` at even ``(x, y)``."""
    if (x, y, out_w, out_h) == (0, 0, width, height):
        return planes
    flat = planes.reshape(-1)
    yp = flat[: width * height].reshape(height, width)
    cw, ch = width // 2, height // 2
    u = flat[width * height: width * height + cw * ch].reshape(ch, cw)
    v = flat[width * height + cw * ch: width * height + 2 * cw * ch].reshape(ch, cw)
    out = np.empty(out_h * out_w * 3 // 2, dtype=np.uint8)
    ocw, och = out_w // 2, out_h // 2
    out[: out_w * out_h].reshape(out_h, out_w)[:] = yp[y: y + out_h, x: x + out_w]
    out[out_w * out_h: out_w * out_h + ocw * och].reshape(och, ocw)[:] = u[y // 2: y // 2 + och, x // 2: x // 2 + ocw]
    out[out_w * out_h + ocw * och:].reshape(och, ocw)[:] = v[y // 2: y // 2 + och, x // 2: x // 2 + ocw]
    return out.reshape(out_h * 3 // 2, out_w)


class LoaderVideo(PyAVVideo):
    """The PyAV backend for the training loader: one kept scaler, ``yuv420p`` or ``rgb24`` frames."""

    def __init__(self, path, index=None, threads: int = 0, pixel_format: str = "yuv420p"):
        super().__init__(path, index, threads)
        if pixel_format not in ("yuv420p", "rgb24"):
            raise ValueError(f"pixel_format must be yuv420p or rgb24, got {pixel_format!r}")
        if pixel_format == "yuv420p" and self.index.orientation:
            raise ValueError("yuv420p frames of a rotated video: use rgb24")
        self.pixel_format = pixel_format
        self._live_scaler = None
        self._yuv_geoms: dict = {}

    def _scaler(self):
        if self._live_scaler is None:
            from av.video.reformatter import VideoReformatter

            self._live_scaler = VideoReformatter()
        return self._live_scaler

    def _convert(self, frame, geom: Geometry):
        """RGB: ``uint8 [H, W, 3]``. I420: ``(frame, geometry)``, copied into place by :meth:`write`
        (no intermediate array: the planes go straight from the decoder's buffers to the pool)."""
        sc = self._scaler()
        self.stats["converted_frames"] += 1
        if self.pixel_format == "rgb24":
            o = self.index.orientation
            if geom.native:
                return orient(sc.reformat(frame, format="rgb24", threads=1).to_ndarray(), o)
            sw, sh = coded_size(geom.scale_w, geom.scale_h, o)
            arr = orient(sc.reformat(frame, width=sw, height=sh, format="rgb24", interpolation=SCALER,
                                     threads=1).to_ndarray(), o)
            return arr[geom.crop_y: geom.crop_y + geom.out_h, geom.crop_x: geom.crop_x + geom.out_w]
        g = self._yuv_geoms.get(geom)
        if g is None:
            g = self._yuv_geoms[geom] = yuv_geometry(geom)
        if g.native:
            fr = frame if frame.format.name == "yuv420p" else sc.reformat(frame, format="yuv420p", threads=1)
        else:
            fr = sc.reformat(frame, width=g.scale_w, height=g.scale_h, format="yuv420p", interpolation=SCALER,
                             threads=1)
        return fr, g

    @staticmethod
    def write(converted, dst: np.ndarray) -> None:
        """Put a :meth:`_convert` result into ``dst`` (``[H, W, 3]`` RGB or ``[H * 3/2, W]`` I420)."""
        if isinstance(converted, np.ndarray):
            dst[...] = converted
            return
        fr, g = converted
        ow, oh = g.out_w, g.out_h
        flat = dst.reshape(-1)
        off = 0
        for k, plane in enumerate(fr.planes[:3]):
            d = 1 if k == 0 else 2
            w, h, x, y = ow // d, oh // d, g.crop_x // d, g.crop_y // d
            src = np.frombuffer(plane, dtype=np.uint8).reshape(-1, plane.line_size)
            flat[off: off + w * h].reshape(h, w)[...] = src[y: y + h, x: x + w]
            off += w * h

    def __getstate__(self):
        d = super().__getstate__()
        d["_yuv_geoms"] = {}
        return d


def yuv420_to_rgb(yuv: torch.Tensor, matrix: torch.Tensor | int = BT601) -> torch.Tensor:
    """I420 frames ``uint8 [..., H * 3/2, W]`` -> RGB ``uint8 [..., 3, H, W]`` on their device.

    ``matrix``: one :data:`BT601` .. :data:`BT709_FULL` code, or one per clip (broadcast over the
    leading dims). Each chroma sample covers its 2 x 2 pixels, as swscale's unscaled converter does.
    """
    *lead, h3, w = yuv.shape
    h = h3 * 2 // 3
    x = yuv.reshape(-1, h3 * w)
    n = x.shape[0]
    y = x[:, : h * w].reshape(n, 1, h, w).float()
    c = x[:, h * w:].reshape(n, 2, h // 2, w // 2).float()
    c = c.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) - 128.0  # each chroma sample on 2 x 2 pixels
    m = torch.as_tensor(matrix, device=yuv.device)
    if m.dim() == 0:
        m = m.expand(n)
    else:  # codes for the leading dims (e.g. [B] for [B, T, ...]): broadcast to every frame
        m = m.reshape(*m.shape, *([1] * (len(lead) - m.dim()))).expand(*lead).reshape(-1)
    full = (m >= 2).float().view(n, 1, 1, 1)
    bt709 = (m % 2 == 1)
    kr = torch.where(bt709, 0.2126, 0.299).float().view(n, 1, 1, 1)
    kb = torch.where(bt709, 0.0722, 0.114).float().view(n, 1, 1, 1)
    kg = 1.0 - kr - kb
    ys = full + (1 - full) * (255.0 / 219.0)
    cs = full + (1 - full) * (255.0 / 224.0)
    yy = (y - (1 - full) * 16.0) * ys
    cb, cr = c[:, :1] * cs, c[:, 1:] * cs
    r = yy + 2.0 * (1.0 - kr) * cr
    b = yy + 2.0 * (1.0 - kb) * cb
    g = yy - (2.0 * kb * (1.0 - kb) * cb + 2.0 * kr * (1.0 - kr) * cr) / kg
    rgb = torch.cat([r, g, b], dim=1).round_().clamp_(0, 255).to(torch.uint8)
    return rgb.reshape(*lead, 3, h, w)

"""Reading and writing mp4 files: the one place where pixels are ``uint8 (T, H, W, 3)``.

Writing uses PyAV (libx264, ``yuv420p``, ``+faststart``) so files play in a browser and in
the MLflow UI; reading uses decord, the same decoder the datasets use.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import av
import decord
import numpy as np


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, crf: int = 18) -> None:
    """Write RGB frames as a browser-playable H.264 mp4, atomically.

    Args:
        path: destination file; its folder must exist. Written to a temporary file in the same
            folder first, then moved into place with ``os.replace``, so a reader never sees a
            half-written file.
        frames: ``uint8 (T, H, W, 3)`` RGB, ``T >= 1``. ``H`` and ``W`` must be even
            (``yuv420p`` subsamples chroma 2x2).
        fps: frames per second stored in the container.
        crf: x264 constant rate factor (0 = lossless luma, 18 = visually lossless, 51 = worst).

    The same frames give a byte-identical file: single-threaded, and x264's macroblock-tree
    rate control (``mbtree``) off, as its asm path is not deterministic in practice.

    Raises:
        ValueError: wrong dtype/rank, no frames, or an odd height/width (names path and size).
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"write_mp4({path}): expected uint8 (T, H, W, 3) frames, got {frames.dtype} {frames.shape}"
        )
    num_frames, height, width, _ = frames.shape
    if num_frames == 0:
        raise ValueError(f"write_mp4({path}): no frames to write")
    if height % 2 or width % 2:
        raise ValueError(
            f"write_mp4({path}): H.264 yuv420p needs even height and width, got {height}x{width} (HxW)"
        )

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.mp4", dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp_name, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # mbtree=0: with x264's asm mbtree the same frames gave different bitstreams from
            # run to run (~30% of 32x32 clips, at every size tried); without it they never did.
            stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
            stream.codec_context.thread_count = 1  # output must not depend on the machine's cores
            for frame in frames:
                rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                for packet in stream.encode(rgb):  # converted to yuv420p (BT.601, limited range)
                    container.mux(packet)
            for packet in stream.encode():  # flush delayed (B-)frames
                container.mux(packet)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise


def decode_frames(reader: decord.VideoReader, indices: list[int]) -> np.ndarray:
    """Decode the frames ``indices`` from an open decord reader.

    Works around decord 0.6's padded-row bug (dmlc/decord#336): for some widths (8, 12, 16,
    24, 48, 72, ...) FFmpeg pads each RGB row, ``get_batch`` then fails with "DECORDArrayCopyFromTo:
    The size must exactly match" and single frames come back as ``(H, W, row_bytes // W)``.
    Those are read one by one and the padding is cut off.

    Returns:
        ``uint8 (len(indices), H, W, 3)`` RGB frames.
    """
    try:
        return reader.get_batch(indices).asnumpy()
    except decord.DECORDError as exc:
        if "DECORDArrayCopyFromTo" not in str(exc):
            raise
    frames = []
    for i in indices:
        frame = reader[i].asnumpy()  # (H, W, row_bytes // W), rows padded
        height, width = frame.shape[:2]
        frames.append(frame.reshape(height, -1)[:, : width * 3].reshape(height, width, 3))
    return np.stack(frames)


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video with decord.

    Args:
        path: any container/codec decord (FFmpeg) can read.

    Returns:
        ``uint8 (T, H, W, 3)`` RGB frames.
    """
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    return decode_frames(reader, list(range(len(reader))))


def describe_container(path: str | os.PathLike) -> str:
    """What FFmpeg (through PyAV) finds in a file, for the message about a video decord rejected:
    ``"no video stream: audio aac in a mov,mp4,m4a,3gp,3g2,mj2 container"``, ``"video av1 in a
    matroska,webm container"``, or why FFmpeg cannot open it either (random bytes, a cut header)."""
    try:
        with av.open(str(path)) as container:
            streams = [f"{s.type} {_codec_name(s)}" for s in container.streams]
            where = f"in a {container.format.name} container"
    except Exception as exc:  # av.FFmpegError subclasses; anything else is as unreadable
        return f"not a container FFmpeg can open ({getattr(exc, 'strerror', None) or type(exc).__name__})"
    if not any(s.startswith("video ") for s in streams):
        return f"no video stream: {', '.join(streams) or 'no streams'} {where}"
    return f"{', '.join(streams)} {where}"


def _codec_name(stream: av.stream.Stream) -> str:
    """The codec's own name (``av1``), not its decoder's (``libdav1d``); ``?`` for a data stream."""
    codec = getattr(stream.codec_context, "codec", None)
    return codec.canonical_name if codec is not None else "?"

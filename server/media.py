"""Encoding generated images and videos into the bytes clients download.

Encoding failures are detected where they happen and raised as ``VideoEncodingError``, whose
message names the size and codec but never the temporary file the encoder wrote to.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

from PIL import Image

from slimserve.errors import SlimserveError
from slimserve.server.engines.base import Video

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_MP4_CODEC = "mp4v"


class VideoEncodingError(SlimserveError):
    """The MP4 encoder failed. ``rejected_size`` is true when it refused the frame size (the client can fix that)."""

    def __init__(self, message: str, *, rejected_size: bool, expected: str | None = None) -> None:
        super().__init__(message, field="size" if rejected_size else None, expected=expected)
        self.rejected_size = rejected_size


def encode_image(image: Image.Image, output_format: str) -> bytes:
    """Encode one image as PNG, JPEG or WebP (the OpenAI ``output_format`` values)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=_PIL_FORMAT[output_format])
    return buffer.getvalue()


def encode_thumbnail(video: Video) -> bytes:
    """The first frame as PNG (the ``thumbnail`` variant of ``/v1/videos/{id}/content``)."""
    return encode_image(Image.fromarray(video.frames[0]), "png")


def encode_mp4(video: Video) -> bytes:
    """Encode frames as MP4 (MPEG-4 Part 2) with OpenCV, which vLLM's CPU wheel already ships.

    OpenCV reports failures only through return values: ``isOpened()`` is false when the codec
    refuses the frame size (MPEG-4 Part 2 takes 2 to 8191 pixels per side), ``write`` returns
    nothing, and a failed write shows as a missing or empty file; each is checked here.
    """
    import cv2

    frames, height, width = video.frames.shape[:3]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*_MP4_CODEC), video.fps, (width, height))
        if not writer.isOpened():
            raise VideoEncodingError(f"the {_MP4_CODEC} MP4 encoder cannot encode {width}x{height} frames",
                                     rejected_size=True, expected="2 to 8191 pixels per side")
        try:
            for frame in video.frames:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        content = path.read_bytes() if path.is_file() else b""
    if not content:
        raise VideoEncodingError(f"the {_MP4_CODEC} MP4 encoder wrote nothing for {frames} frames of "
                                 f"{width}x{height}", rejected_size=False)
    return content

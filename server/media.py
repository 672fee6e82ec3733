"""Encoding generated images and videos into the bytes clients download."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

from PIL import Image

from slimserve.server.engines.base import Video

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: Image.Image, output_format: str) -> bytes:
    """Encode one image as PNG, JPEG or WebP (the OpenAI ``output_format`` values)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=_PIL_FORMAT[output_format])
    return buffer.getvalue()


def encode_thumbnail(video: Video) -> bytes:
    """The first frame as PNG (the ``thumbnail`` variant of ``/v1/videos/{id}/content``)."""
    return encode_image(Image.fromarray(video.frames[0]), "png")


def encode_mp4(video: Video) -> bytes:
    """Encode frames as MP4 (MPEG-4 Part 2) with OpenCV, which vLLM's CPU wheel already ships."""
    import cv2

    height, width = video.frames.shape[1:3]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), video.fps, (width, height))
        for frame in video.frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        return path.read_bytes()

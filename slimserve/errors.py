"""Typed errors that reach users, for every room.

One base, :class:`SlimserveError`, formats *where* (file, tensor, field, step, layer, head) and
*what was expected*, so a message from the loaders, the compressor, a schedule or the server
reads the same way. The CLI prints any of them and exits 2; the server answers them as 400s.
"""

from __future__ import annotations

from pathlib import Path


class SlimserveError(Exception):
    """Base class of every error slimserve reports to a user.

    ``where`` items are rendered in a fixed order (file, tensor, field, step, layer, head) before
    the message, and ``expected`` after it, e.g.
    ``file ckpt/model.safetensors, tensor 'x.U': wrong shape (expected [64, 8])``.
    """

    #: How the ``file`` location is named in messages ("file", or "schedule" for schedules).
    file_label = "file"

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        tensor: str | None = None,
        field: str | None = None,
        step: int | None = None,
        layer: int | str | None = None,
        head: int | None = None,
        expected: str | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        self.field = field
        self.step = step
        self.layer = layer
        self.head = head
        self.expected = expected
        where = [f"{self.file_label} {self.file}"] if self.file else []
        if tensor:
            where.append(f"tensor '{tensor}'")
        if field:
            where.append(f"field '{field}'")
        where += [f"{name} {value}" for name, value in (("step", step), ("layer", layer), ("head", head))
                  if value is not None]
        text = (", ".join(where) + ": " if where else "") + message
        if expected:
            text += f" (expected {expected})"
        super().__init__(text)


class CheckpointError(SlimserveError):
    """A checkpoint (or another tool's output being converted) is malformed."""


class CompressionError(SlimserveError):
    """Compression cannot proceed (bad ratio, unsupported architecture, bad calibration data)."""


class ScheduleError(SlimserveError):
    """A Sparse-vDiT schedule is malformed or does not fit the model it is applied to."""

    file_label = "schedule"

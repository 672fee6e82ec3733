"""Typed errors that reach users. Each names the file, tensor or field and what was expected."""

from __future__ import annotations

from pathlib import Path


class SlimserveError(Exception):
    """Base class of every error slimserve reports to a user (the CLI prints it and exits 2)."""


class CheckpointError(SlimserveError):
    """A checkpoint is malformed: names the file, the tensor or config field, and what was expected."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        tensor: str | None = None,
        field: str | None = None,
        expected: str | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        self.field = field
        self.expected = expected
        where = []
        if self.file:
            where.append(f"file {self.file}")
        if tensor:
            where.append(f"tensor '{tensor}'")
        if field:
            where.append(f"field '{field}'")
        text = (", ".join(where) + ": " if where else "") + message
        if expected:
            text += f" (expected {expected})"
        super().__init__(text)


class CompressionError(SlimserveError):
    """Compression cannot proceed (bad ratio, unsupported architecture, bad calibration data)."""


class ScheduleError(SlimserveError):
    """A Sparse-vDiT schedule is malformed or does not fit the model it is applied to.

    Names the schedule file, the field, and where relevant the step, layer and head, and what
    was expected.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        field: str | None = None,
        step: int | None = None,
        layer: int | None = None,
        head: int | None = None,
        expected: str | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        self.field = field
        self.step = step
        self.layer = layer
        self.head = head
        self.expected = expected
        where = [f"schedule {self.file}"] if self.file else []
        if field:
            where.append(f"field '{field}'")
        where += [f"{name} {value}" for name, value in (("step", step), ("layer", layer), ("head", head)) if value is not None]
        text = (", ".join(where) + ": " if where else "") + message
        if expected:
            text += f" (expected {expected})"
        super().__init__(text)

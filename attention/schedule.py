"""The Sparse-vDiT schedule: the searched mode of every (denoising step, layer, head).

The file format is documented in ``SCHEDULE.md`` next to this module. A schedule is bound to
one transformer class, its layer and head counts, and the token layout it was searched at;
:meth:`Schedule.check_model` and :meth:`Schedule.check_layout` refuse anything else with a
:class:`~slimserve.errors.ScheduleError`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimserve.attention.patterns import Mode, PatternParams, VideoLayout, num_blocks, sparsity
from slimserve.errors import ScheduleError

FORMAT = "slimserve.sparse_vdit"
VERSION = 1
FILENAME = "sparse_vdit_schedule.json"


@dataclass
class Schedule:
    """Modes ``modes[step][layer][head]``, stripe columns per STRIPE head, and their context."""

    model_class: str
    num_layers: int
    num_heads: int
    layout: VideoLayout
    params: PatternParams
    timesteps: list[float]
    modes: list[list[list[Mode]]]
    stripes: dict[tuple[int, int, int], tuple[int, ...]] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    # ---- lookup ----------------------------------------------------------------------------

    def step_for(self, timestep: float) -> int:
        """Index of the searched step whose timestep is nearest (CFG calls share a step)."""
        return min(range(len(self.timesteps)), key=lambda i: abs(self.timesteps[i] - timestep))

    def modes_at(self, step: int, layer: int) -> list[Mode]:
        return self.modes[step][layer]

    def stripes_at(self, step: int, layer: int) -> dict[int, tuple[int, ...]]:
        return {h: cols for (s, at_layer, h), cols in self.stripes.items() if s == step and at_layer == layer}

    def is_dense(self, step: int, layer: int) -> bool:
        return all(mode is Mode.FULL for mode in self.modes[step][layer])

    # ---- checks against a model ---------------------------------------------------------------

    def _error(self, message: str, **where: Any) -> ScheduleError:
        return ScheduleError(message, file=self.path, **where)

    def check_model(self, model_class: str, num_layers: int, num_heads: int) -> None:
        """Refuse a schedule searched for another transformer."""
        for name, have, want in (
            ("model_class", self.model_class, model_class),
            ("num_layers", self.num_layers, num_layers),
            ("num_heads", self.num_heads, num_heads),
        ):
            if have != want:
                raise self._error(f"schedule has {have!r} but the model has {want!r}", field=name, expected=repr(want))

    def check_layout(self, layout: VideoLayout) -> None:
        """Refuse inputs of another shape: the masks and stripe columns are position-specific."""
        if layout != self.layout:
            raise self._error(
                f"the input's token layout is {layout}; stripe columns and windows were searched for another",
                field="layout",
                expected=str(self.layout),
            )

    # ---- statistics ----------------------------------------------------------------------------

    def density(self) -> float:
        """Mean fraction of attention tiles computed over all (step, layer, head): FLOPs kept."""
        kept = 0.0
        for step, layers in enumerate(self.modes):
            for layer, heads in enumerate(layers):
                for head, mode in enumerate(heads):
                    stripe = self.stripes.get((step, layer, head))
                    kept += 1.0 - sparsity(mode, self.layout, self.params, stripe)
        return kept / (len(self.modes) * self.num_layers * self.num_heads)

    def skipped_heads(self) -> int:
        """Heads skipped per denoising step (summed over layers), averaged over the searched steps."""
        skipped = sum(mode is Mode.SKIP for layers in self.modes for heads in layers for mode in heads)
        return round(skipped / len(self.modes)) if self.modes else 0

    def histogram(self) -> list[Counter]:
        """Per layer, how many (step, head) pairs chose each mode."""
        return [Counter(m for layers in self.modes for m in layers[layer]) for layer in range(self.num_layers)]

    def report(self) -> str:
        """Mode histogram per layer and the theoretical attention-FLOP reduction."""
        lines = [f"{'layer':>5} " + " ".join(f"{m.name:>14}" for m in Mode)]
        for layer, counts in enumerate(self.histogram()):
            lines.append(f"{layer:>5} " + " ".join(f"{counts.get(m, 0):>14}" for m in Mode))
        density = self.density()
        reduction = math.inf if density == 0 else 1.0 / density
        lines.append(f"attention tiles computed: {density:.1%}  theoretical attention-FLOP reduction: {reduction:.2f}x")
        return "\n".join(lines)

    # ---- file ----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_class": self.model_class,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "layout": {
                "num_frames": self.layout.num_frames,
                "tokens_per_frame": self.layout.tokens_per_frame,
                "text_len": self.layout.text_len,
                "text_first": self.layout.text_first,
            },
            "params": self.params.to_dict(),
            "search": self.search,
            "timesteps": self.timesteps,
            "modes": [["".join(m.char for m in heads) for heads in layers] for layers in self.modes],
            "stripes": [
                {"step": s, "layer": layer, "head": h, "blocks": list(cols)}
                for (s, layer, h), cols in sorted(self.stripes.items())
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Write the schedule; a directory (the model folder) gets ``sparse_vdit_schedule.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        """Read and validate a schedule file (or the one inside a model folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise ScheduleError("no such file", file=path, expected=f"a {FILENAME} written by `slimserve vdit-search`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ScheduleError(f"not valid JSON: {err}", file=path) from None
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path | None = None) -> Schedule:
        def need(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
            name = f"{where}{key}"
            if key not in obj:
                raise ScheduleError("missing", file=path, field=name)
            if not isinstance(obj[key], kind) or isinstance(obj[key], bool) and kind is not bool:
                raise ScheduleError(f"has type {type(obj[key]).__name__}", file=path, field=name, expected=str(kind))
            return obj[key]

        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ScheduleError(
                f"format {data.get('format')!r} version {data.get('version')!r}",
                file=path, field="format", expected=f"{FORMAT!r} version {VERSION}",
            )
        lay = need(data, "layout", dict)
        layout = VideoLayout(
            num_frames=need(lay, "num_frames", int, "layout."),
            tokens_per_frame=need(lay, "tokens_per_frame", int, "layout."),
            text_len=need(lay, "text_len", int, "layout."),
            text_first=need(lay, "text_first", bool, "layout."),
        )
        par = need(data, "params", dict)
        params = PatternParams(**{k: need(par, k, int, "params.") for k in PatternParams().to_dict()})
        num_layers, num_heads = need(data, "num_layers", int), need(data, "num_heads", int)
        timesteps = [float(t) for t in need(data, "timesteps", list)]
        raw_modes = need(data, "modes", list)
        if len(raw_modes) != len(timesteps):
            raise ScheduleError(
                f"{len(raw_modes)} steps of modes", file=path, field="modes",
                expected=f"{len(timesteps)} (one per timestep)"
            )
        modes: list[list[list[Mode]]] = []
        for step, layers in enumerate(raw_modes):
            if not isinstance(layers, list) or len(layers) != num_layers:
                raise ScheduleError("wrong number of layers", file=path, field="modes", step=step,
                                    expected=f"{num_layers}")
            modes.append([])
            for layer, heads in enumerate(layers):
                if not isinstance(heads, str) or len(heads) != num_heads or set(heads) - set("FSDMV"):
                    raise ScheduleError(
                        f"got {heads!r}", file=path, field="modes", step=step, layer=layer,
                        expected=f"a string of {num_heads} letters from F, S, D, M, V",
                    )
                modes[step].append([Mode.from_char(c) for c in heads])
        total_blocks = num_blocks(layout, params.block_size)
        stripes: dict[tuple[int, int, int], tuple[int, ...]] = {}
        for entry in need(data, "stripes", list):
            step, layer, head = (need(entry, k, int, "stripes[].") for k in ("step", "layer", "head"))
            blocks = need(entry, "blocks", list, "stripes[].")
            in_range = 0 <= step < len(modes) and 0 <= layer < num_layers and 0 <= head < num_heads
            if not in_range or modes[step][layer][head] is not Mode.STRIPE:
                raise ScheduleError("stripe columns for a head that is not a STRIPE head", file=path,
                                    field="stripes", step=step, layer=layer, head=head,
                                    expected="mode V at this position")
            if not blocks or not all(isinstance(b, int) and 0 <= b < total_blocks for b in blocks):
                raise ScheduleError(f"blocks {blocks}", file=path, field="stripes", step=step, layer=layer,
                                    head=head, expected=f"a non-empty list of key-block indices in [0, {total_blocks})")
            stripes[(step, layer, head)] = tuple(blocks)
        for step, layers in enumerate(modes):
            for layer, heads in enumerate(layers):
                for head, mode in enumerate(heads):
                    if mode is Mode.STRIPE and (step, layer, head) not in stripes:
                        raise ScheduleError("STRIPE head without columns", file=path, field="stripes",
                                            step=step, layer=layer, head=head, expected="an entry in 'stripes'")
        return cls(
            model_class=need(data, "model_class", str),
            num_layers=num_layers,
            num_heads=num_heads,
            layout=layout,
            params=params,
            timesteps=timesteps,
            modes=modes,
            stripes=stripes,
            search=data.get("search", {}),
            path=path,
        )

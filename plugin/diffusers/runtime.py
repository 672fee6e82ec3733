"""Installing Sparse-vDiT on a diffusers video transformer: ``apply`` and the offline ``search``.

A forward pre-hook on the transformer reads each call's timestep and input shapes, so the
processors know the denoising step and the token layout without the pipeline's help. Steps
are keyed by timestep value, not by call count, because Wan and HunyuanVideo call the
transformer twice per step under classifier-free guidance while CogVideoX batches both.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimserve.attention.kernels import fused_attention
from slimserve.attention.patterns import Mode, PatternParams, VideoLayout
from slimserve.attention.schedule import Schedule
from slimserve.attention.search import choose_modes
from slimserve.errors import ScheduleError
from slimserve.plugin.diffusers.processors import (
    CogVideoXSparseVDiTProcessor,
    Controller,
    HunyuanVideoSparseVDiTProcessor,
    WanSparseVDiTProcessor,
)


@dataclass(frozen=True)
class ModelSpec:
    """How one transformer class is patched: its self-attention modules and token layout."""

    processor: type
    attention_modules: Callable[[nn.Module], list[nn.Module]]
    layout: Callable[[Any, torch.Tensor, torch.Tensor | None], VideoLayout]


def _wan_layout(config: Any, hidden: torch.Tensor, text: torch.Tensor | None) -> VideoLayout:
    _, _, frames, height, width = hidden.shape  # (B, C, F, H, W)
    p_t, p_h, p_w = config.patch_size
    return VideoLayout(frames // p_t, (height // p_h) * (width // p_w))


def _hunyuan_layout(config: Any, hidden: torch.Tensor, text: torch.Tensor | None) -> VideoLayout:
    _, _, frames, height, width = hidden.shape  # (B, C, F, H, W); text follows the video
    p, p_t = config.patch_size, config.patch_size_t
    return VideoLayout(frames // p_t, (height // p) * (width // p), text_len=text.shape[1], text_first=False)


def _cogvideox_layout(config: Any, hidden: torch.Tensor, text: torch.Tensor | None) -> VideoLayout:
    _, frames, _, height, width = hidden.shape  # (B, F, C, H, W); text precedes the video
    p, p_t = config.patch_size, config.patch_size_t
    frames = frames if p_t is None else frames // p_t
    return VideoLayout(frames, (height // p) * (width // p), text_len=text.shape[1], text_first=True)


SPECS: dict[str, ModelSpec] = {
    "WanTransformer3DModel": ModelSpec(
        WanSparseVDiTProcessor, lambda m: [block.attn1 for block in m.blocks], _wan_layout
    ),
    "HunyuanVideoTransformer3DModel": ModelSpec(
        HunyuanVideoSparseVDiTProcessor,
        lambda m: [block.attn for block in (*m.transformer_blocks, *m.single_transformer_blocks)],
        _hunyuan_layout,
    ),
    "CogVideoXTransformer3DModel": ModelSpec(
        CogVideoXSparseVDiTProcessor, lambda m: [block.attn1 for block in m.transformer_blocks], _cogvideox_layout
    ),
}


def load_pipeline(model_dir: str | Path) -> Any:
    """The diffusers pipeline of a model folder (``model_index.json``) in float32, as served and searched.

    Serving and ``vdit-search`` load through this one function so that a schedule is searched
    on exactly the pipeline (class, dtype) it will run on.
    """
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(model_dir), dtype=torch.float32)


def transformer_of(pipe_or_transformer: Any) -> nn.Module:
    """The video transformer of a pipeline, or the argument itself."""
    return getattr(pipe_or_transformer, "transformer", pipe_or_transformer)


def spec_of(transformer: nn.Module) -> ModelSpec:
    name = type(transformer).__name__
    if name not in SPECS:
        raise ScheduleError(f"Sparse-vDiT does not support {name}", field="model_class", expected=" or ".join(SPECS))
    return SPECS[name]


class ScheduleController(Controller):
    """Runs a searched schedule."""

    def __init__(self, schedule: Schedule, backend: str) -> None:
        super().__init__(backend)
        self.schedule = schedule

    def begin(self, timestep: float, layout: VideoLayout) -> None:
        self.schedule.check_layout(layout)
        self.layout = layout
        self.step = self.schedule.step_for(timestep)

    def dense(self, layer: int) -> bool:
        return self.schedule.is_dense(self.step, layer)

    def attend(self, layer, q, k, v, key_valid):
        s = self.schedule
        return fused_attention(
            q, k, v, s.modes_at(self.step, layer), s.layout, s.params,
            s.stripes_at(self.step, layer), self.backend, key_valid,
        )


class SearchController(Controller):
    """Searches while the pipeline runs: decides each (step, layer) on its first call.

    Later calls at the same (step, layer), e.g. the unconditional half of classifier-free
    guidance, reuse that decision, so the run follows exactly the trajectory the schedule will.
    """

    def __init__(self, lam: float, eps: float, params: PatternParams | None, block_size: int, backend: str) -> None:
        super().__init__(backend)
        self.lam, self.eps = lam, eps
        self.params, self.block_size = params, block_size
        self.timesteps: list[float] = []
        self.choices: dict[tuple[int, int], tuple[list[Mode], dict[int, tuple[int, ...]]]] = {}

    def begin(self, timestep: float, layout: VideoLayout) -> None:
        if self.layout is not None and layout != self.layout:
            raise ScheduleError(f"calibration inputs changed layout to {layout}", field="layout",
                                expected=str(self.layout))
        self.layout = layout
        if self.params is None:
            self.params = PatternParams.for_layout(layout, self.block_size)
        if timestep not in self.timesteps:
            self.timesteps.append(timestep)
        self.step = self.timesteps.index(timestep)

    def dense(self, layer: int) -> bool:
        return False

    def attend(self, layer, q, k, v, key_valid):
        key = (self.step, layer)
        if key in self.choices:
            modes, stripes = self.choices[key]
            return fused_attention(q, k, v, modes, self.layout, self.params, stripes, self.backend, key_valid)
        choice = choose_modes(q, k, v, self.layout, self.params, self.lam, self.eps, self.backend, key_valid)
        self.choices[key] = (choice.modes, choice.stripes)
        return choice.output


class Installed:
    """Processors and hook installed on one transformer; :meth:`remove` restores the stock ones."""

    def __init__(self, transformer: nn.Module, controller: Controller) -> None:
        spec = spec_of(transformer)
        self.transformer = transformer
        self.controller = controller
        self.modules = spec.attention_modules(transformer)
        self._stock = [module.get_processor() for module in self.modules]
        for layer, module in enumerate(self.modules):
            module.set_processor(spec.processor(layer, controller))
        signature = inspect.signature(transformer.forward)

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            bound = signature.bind_partial(*args, **kwargs).arguments
            timestep = float(torch.as_tensor(bound["timestep"]).flatten()[0])
            layout = spec.layout(module.config, bound["hidden_states"], bound.get("encoder_hidden_states"))
            controller.begin(timestep, layout)

        self._hook = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)

    @property
    def num_heads(self) -> int:
        return self.modules[0].heads

    def remove(self) -> None:
        self._hook.remove()
        for module, processor in zip(self.modules, self._stock):
            module.set_processor(processor)


def apply(pipe_or_transformer: Any, schedule: Schedule | str | Path, backend: str = "auto") -> Installed:
    """Run a diffusers video pipeline (or transformer) with a searched Sparse-vDiT schedule.

    ``schedule`` is a :class:`Schedule`, a schedule file, or the model folder holding one.
    Raises :class:`ScheduleError` when the schedule was searched for another model.
    """
    transformer = transformer_of(pipe_or_transformer)
    if not isinstance(schedule, Schedule):
        schedule = Schedule.load(schedule)
    modules = spec_of(transformer).attention_modules(transformer)
    schedule.check_model(type(transformer).__name__, len(modules), modules[0].heads)
    return Installed(transformer, ScheduleController(schedule, backend))


def search(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    *,
    lam: float = 0.5,
    eps: float = 1.0,
    params: PatternParams | None = None,
    block_size: int = 128,
    backend: str = "auto",
    **pipe_kwargs: Any,
) -> Schedule:
    """Search a schedule by running ``pipe`` once on the calibration prompts (as one batch).

    ``pipe_kwargs`` go to the pipeline (steps, size, frames, seed generator, or
    ``prompt_embeds`` instead of prompts). Pattern parameters default to
    :meth:`PatternParams.for_layout` with ``block_size``.
    """
    transformer = transformer_of(pipe)
    controller = SearchController(lam, eps, params, block_size, backend)
    installed = Installed(transformer, controller)
    try:
        with torch.no_grad():
            pipe(**({"prompt": list(prompts)} if prompts is not None else {}), **pipe_kwargs)
    finally:
        installed.remove()
    num_layers = len(installed.modules)
    modes = [[controller.choices[(step, layer)][0] for layer in range(num_layers)]
             for step in range(len(controller.timesteps))]
    stripes = {
        (step, layer, head): cols
        for (step, layer), (_, layer_stripes) in controller.choices.items()
        for head, cols in layer_stripes.items()
    }
    return Schedule(
        model_class=type(transformer).__name__,
        num_layers=num_layers,
        num_heads=installed.num_heads,
        layout=controller.layout,
        params=controller.params,
        timesteps=controller.timesteps,
        modes=modes,
        stripes=stripes,
        search={"lambda": lam, "epsilon": eps, "prompts": len(prompts) if prompts is not None else None},
    )


def search_folder(
    model_dir: str | Path,
    prompts: Sequence[str],
    *,
    out: str | Path | None = None,
    seed: int = 0,
    lam: float = 0.5,
    eps: float = 1.0,
    block_size: int = 128,
    backend: str = "auto",
    **pipe_kwargs: Any,
) -> tuple[Schedule, Path]:
    """``slimserve vdit-search``: load a diffusers pipeline folder, search, save the schedule.

    The schedule goes next to the model (``<model_dir>/sparse_vdit_schedule.json``) unless
    ``out`` names another file or folder.
    """
    pipe = load_pipeline(model_dir)
    generator = torch.Generator().manual_seed(seed)
    schedule = search(
        pipe, prompts, lam=lam, eps=eps, block_size=block_size, backend=backend, generator=generator,
        output_type="latent", **pipe_kwargs,
    )
    return schedule, schedule.save(out if out is not None else model_dir)

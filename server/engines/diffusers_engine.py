"""Engines over diffusers pipelines: text-to-image and text-to-video DiTs.

A folder with ``model_index.json`` is loaded by the plugin's ``load_pipeline`` (the loader
``vdit-search`` uses); the pipeline's output decides the task (``frames`` means video). Optional request fields are
passed only when the pipeline's ``__call__`` accepts them, because pipelines differ in what
they take (PixArt has no ``num_frames``, Wan no ``num_images_per_prompt``).

A Sparse-vDiT schedule (``slimserve vdit-search`` saves it next to the model) is installed with
``slimserve.plugin.diffusers.apply(pipe, schedule)``; its density and skipped heads feed the
``slimserve:attention_*`` gauges.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from slimserve.attention.schedule import FILENAME as SCHEDULE_FILE
from slimserve.attention.schedule import Schedule
from slimserve.errors import ScheduleError
from slimserve.server.engines.base import (
    Engine,
    EngineRequestError,
    ImageEngine,
    ImageRequest,
    SparsityReport,
    StepCallback,
    Video,
    VideoEngine,
    VideoRequest,
)


class _DiffusersEngine(Engine):
    """Shared pipeline plumbing: loading, the step callback, and optional arguments."""

    def __init__(self, pipe: Any, model_name: str, schedule: Schedule | None = None) -> None:
        super().__init__(model_name)
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.call_signature = inspect.signature(pipe.__call__).parameters
        self.call_parameters = frozenset(self.call_signature)
        self.size_multiple = _size_multiple(pipe)
        # Wan's rotary position table has this many rows per axis (frames, height, width in
        # patches); a larger latent grid fails deep inside the transformer.
        self.max_patches = getattr(pipe.transformer.config, "rope_max_seq_len", None)
        self.schedule = schedule
        if schedule is not None:
            from slimserve.plugin.diffusers import apply

            apply(pipe, schedule)

    def sparsity(self) -> SparsityReport:
        if self.schedule is None:
            return SparsityReport()
        return SparsityReport(attention_density=self.schedule.density(), skipped_heads=self.schedule.skipped_heads())

    def _call(self, request: ImageRequest | VideoRequest, on_step: StepCallback, **task_args: Any) -> Any:
        """Run the pipeline with the request's settings, reporting every denoising step."""
        for side in (request.width, request.height):
            if side is not None and side % self.size_multiple:
                raise EngineRequestError(f"width and height must be multiples of {self.size_multiple} for "
                                         f"{self.model_name}", param="size")
        self._check_positions(request)
        steps = request.num_inference_steps or int(self._default("num_inference_steps") or 50)
        args: dict[str, Any] = {
            "prompt": request.prompt,
            "num_inference_steps": steps,
            "height": request.height,
            "width": request.width,
            "generator": None if request.seed is None else torch.Generator("cpu").manual_seed(request.seed),
            **task_args,
        }
        if request.guidance_scale is not None:
            args["guidance_scale"] = request.guidance_scale
        if request.negative_prompt is not None:
            args["negative_prompt"] = request.negative_prompt
        # Serve exactly the requested size (PixArt would otherwise snap it to its aspect-ratio bins),
        # and skip caption cleaning, which needs optional packages and only logs without them.
        args.update({"use_resolution_binning": False, "clean_caption": False})
        if "callback_on_step_end" in self.call_parameters:
            def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                on_step(step + 1, steps)
                return tensors

            args["callback_on_step_end"] = on_step_end
        else:
            args["callback"] = lambda step, timestep, latents: on_step(step + 1, steps)
            args["callback_steps"] = 1
        accepted = {k: v for k, v in args.items() if k in self.call_parameters and v is not None}
        try:
            with torch.inference_mode():
                return self.pipe(**accepted)
        except ScheduleError as err:
            # A schedule is searched for one token layout (size, frames): another request size is the
            # client's choice to change, not a server fault.
            raise EngineRequestError(f"this model's sparse-attention schedule does not fit the request: {err}",
                                     param="size") from err

    def _default(self, parameter: str) -> Any:
        """The pipeline's own default for a call parameter the request left out (None if it has none)."""
        default = self.call_signature.get(parameter)
        return None if default is None or default.default is inspect.Parameter.empty else default.default

    def _check_positions(self, request: ImageRequest | VideoRequest) -> None:
        """A 400 for a size or length past the model's position table (with the pipeline's defaults filled in)."""
        if not self.max_patches:
            return
        for name in ("height", "width"):
            side = getattr(request, name) or self._default(name)
            if side is not None and side // self.size_multiple > self.max_patches:
                raise EngineRequestError(
                    f"{name} {side} is too large for {self.model_name}: its rotary position table covers "
                    f"{self.max_patches} patches per axis, at most {self.max_patches * self.size_multiple} pixels",
                    param="size")
        temporal = getattr(self.pipe, "vae_scale_factor_temporal", None)
        frames = getattr(request, "num_frames", None) or self._default("num_frames")
        if temporal and frames:
            latent_frames = ((int(frames) - 1) // int(temporal) + 1) // _patch_size(self.pipe)[0]
            if latent_frames > self.max_patches:
                raise EngineRequestError(
                    f"num_frames {frames} is too long for {self.model_name}: its rotary position table covers "
                    f"{self.max_patches} latent frames", param="num_frames")


def _size_multiple(pipe: Any) -> int:
    """Pixel sizes must divide into whole VAE latents and then whole transformer patches."""
    vae_factor = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8)
    return int(vae_factor) * _patch_size(pipe)[1]


def _patch_size(pipe: Any) -> tuple[int, int]:
    """The transformer's (temporal, spatial) patch size: Wan's (t, h, w) or an image DiT's single int."""
    patch = getattr(pipe.transformer.config, "patch_size", 1) or 1
    if isinstance(patch, (list, tuple)):
        return (int(patch[0]) if len(patch) == 3 else 1), int(patch[-1])
    return 1, int(patch)


class DiffusersImageEngine(_DiffusersEngine, ImageEngine):
    """Text-to-image pipelines (PixArt, SD3, Flux, ...)."""

    def generate_images(self, request: ImageRequest, on_step: StepCallback) -> list[Image.Image]:
        output = self._call(request, on_step, num_images_per_prompt=request.n, output_type="pil")
        return list(output.images)


class DiffusersVideoEngine(_DiffusersEngine, VideoEngine):
    """Text-to-video pipelines (Wan, CogVideoX, ...)."""

    def generate_video(self, request: VideoRequest, on_step: StepCallback) -> Video:
        output = self._call(request, on_step, num_frames=request.num_frames, output_type="np")
        frames = np.asarray(output.frames[0])
        return Video(frames=(np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8), fps=request.fps)


def load_diffusers_engine(model_dir: str | Path, model_name: str,
                          schedule: Schedule | None = None) -> DiffusersImageEngine | DiffusersVideoEngine:
    """Load the pipeline in ``model_dir`` and wrap it in the engine for its task.

    A Sparse-vDiT schedule saved next to the model by ``slimserve vdit-search``
    (``sparse_vdit_schedule.json``) is installed unless another ``schedule`` is given.
    """
    from slimserve.plugin.diffusers.runtime import load_pipeline

    if schedule is None and (Path(model_dir) / SCHEDULE_FILE).is_file():
        schedule = Schedule.load(model_dir)

    pipe = load_pipeline(model_dir)
    produces_video = "num_frames" in inspect.signature(pipe.__call__).parameters
    engine_class = DiffusersVideoEngine if produces_video else DiffusersImageEngine
    return engine_class(pipe, model_name, schedule)

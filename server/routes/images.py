"""``/v1/images/generations`` for image engines (diffusers text-to-image pipelines); answers ``b64_json``."""

from __future__ import annotations

import base64
import threading
import time

from fastapi import APIRouter, Request

from slimserve.server import media
from slimserve.server.engines.base import ImageEngine, ImageRequest
from slimserve.server.runner import StepTracker
from slimserve.server.schemas import ImageData, ImageGenerationRequest, ImagesResponse
from slimserve.server.sse import DisconnectWatcher
from slimserve.server.state import State

router = APIRouter()


@router.post("/images/generations", response_model=ImagesResponse)
async def images_generations(body: ImageGenerationRequest, request: Request, state: State) -> ImagesResponse:
    arrival = time.perf_counter()
    engine = state.engine
    assert isinstance(engine, ImageEngine), "image routes are mounted only for image engines"
    state.check_model(body.model)
    state.note_ignored(body)
    state.check_steps(body.num_inference_steps)
    width, height = state.media_size(body.size)
    state.check_pixels(width, height, 1, body.n, param="n")
    image_request = ImageRequest(prompt=body.prompt, n=body.n, width=width, height=height,
                                 num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
                                 negative_prompt=body.negative_prompt, seed=body.seed)
    await state.runner.enqueue().wait()
    cancel = threading.Event()
    tracker = StepTracker(state.metrics, cancel)

    def render() -> list[str]:
        images = engine.generate_images(image_request, tracker)
        return [base64.b64encode(media.encode_image(image, body.output_format)).decode() for image in images]

    async with DisconnectWatcher(request, cancel):
        encoded = await state.finish_media(state.runner.run(render), arrival)
    state.metrics.generated_images.inc(len(encoded))
    return ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=b64) for b64 in encoded],
                          output_format=body.output_format, size=body.size)

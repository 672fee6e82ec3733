"""Request and response bodies of slimserve's OpenAI-compatible API.

Shapes follow openai-python 3.57. Requests accept and ignore unknown fields, as vLLM does
since clients send many optional OpenAI fields (``user``, ``logit_bias``, ...); the app logs
the ignored names. Fields slimserve cannot honour are validated to the values it supports, so
a client learns with a 400 instead of silently getting something else.

This module is the one place where request fields and their limits are declared: the JSON
bodies and the video form (``POST /v1/videos`` is multipart, as the ``openai`` SDK sends it;
FastAPI reads the same model from form fields) share the field types below. Limits that
depend on the server (``ServerConfig``: steps, sides, frames, tokens) are checked by the
routes, because they are operator settings rather than properties of the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

NonEmptyText = Annotated[str, StringConstraints(min_length=1)]
Size = Annotated[str, StringConstraints(pattern=r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$")]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
InferenceSteps = Annotated[int, Field(ge=1, le=1000)]
GuidanceScale = Annotated[float, Field(ge=0.0, le=100.0)]
Side = Annotated[int, Field(ge=1, le=65536)]


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        """Names of fields the client sent that slimserve does not use."""
        return sorted(self.model_extra or {})


class StreamOptions(BaseModel):
    include_usage: bool = False


class SparsedBody(BaseModel):
    """SparseD's knobs (``attention/sparsed.py``): full attention for the first ``skip`` of the steps
    (``skip >= 1``: never sparse), then per head the top ``rho`` of each region's ``block``-token key blocks."""

    model_config = ConfigDict(extra="forbid")

    skip: float = Field(0.2, ge=0.0, le=1.0)
    rho: float = Field(0.3, gt=0.0, le=1.0)
    block: int = Field(128, ge=16, le=4096, multiple_of=16)


class TextRequestBody(RequestBody):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=65536)
    max_completion_tokens: int | None = Field(None, ge=1, le=65536)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Diffusion-LM extensions, sent through ``extra_body``.
    steps: int | None = Field(None, ge=1, le=4096)
    block_length: int | None = Field(None, ge=1, le=4096)
    # SparseD: ``true`` for the defaults, an object to set them, ``false`` to turn off a model's default.
    sparsed: bool | SparsedBody | None = None

    def token_budget(self, default: int) -> int:
        """``max_completion_tokens`` (the newer name) wins over ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens or default

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(TextRequestBody):
    prompt: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=1)]

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, object]]

    def text(self) -> str:
        """Plain text of the message; content parts other than text are rejected upstream."""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content)

    @model_validator(mode="after")
    def _only_text_parts(self) -> ChatMessageIn:
        if isinstance(self.content, list) and any(part.get("type") != "text" for part in self.content):
            raise ValueError("only text content parts are supported")
        return self


class ChatCompletionRequest(TextRequestBody):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]


class MediaRequestBody(RequestBody):
    """Fields every image and video request has: the prompt, the size and the diffusion knobs."""

    prompt: NonEmptyText
    model: str | None = None
    size: Size = "auto"
    # Extensions shared with vLLM-Omni and SGLang.
    num_inference_steps: InferenceSteps | None = None
    guidance_scale: GuidanceScale | None = None
    negative_prompt: str | None = None
    seed: Seed | None = None


class ImageGenerationRequest(MediaRequestBody):
    """``POST /v1/images/generations`` (JSON)."""

    n: int = Field(1, ge=1, le=10)
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"


class VideoGenerationRequest(MediaRequestBody):
    """``POST /v1/videos`` and ``/v1/videos/sync`` (form fields, as the ``openai`` SDK sends them).

    ``seconds`` is OpenAI's duration; ``num_frames`` (which wins over ``seconds * fps``),
    ``fps``, ``width`` and ``height`` (which win over ``size``) are slimserve's extensions.
    """

    seconds: Literal["4", "8", "12"] = "4"
    width: Side | None = None
    height: Side | None = None
    num_frames: int | None = Field(None, ge=1, le=100000)
    fps: int = Field(16, ge=1, le=120)

    @model_validator(mode="before")
    @classmethod
    def _empty_fields_are_unset(cls, data: Any) -> Any:
        """An empty form field means "not sent", as FastAPI treats single ``Form()`` parameters (and HTML forms)."""
        if isinstance(data, Mapping):
            return {name: value for name, value in data.items() if value != ""}
        return data


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slimserve"
    root: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ImageData(BaseModel):
    b64_json: str


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    """OpenAI's ``Video`` object, for jobs of the ``/v1/videos`` API."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    prompt: str
    seconds: str
    size: str
    error: VideoError | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail

"""Checking a request's own Sirius option in vLLM's API server, before the request is scheduled.

vLLM's usual hook for per-request options, a custom logits processor's ``validate_params``, is
refused by vLLM 0.32 whenever speculative decoding is on, which Sirius always is. So the plugin
wraps ``InputProcessor._validate_params``, the check every request passes in the API server
process before it reaches the engine: a bad ``vllm_xargs.sirius`` (or one sent to a server
without Sirius) becomes vLLM's ``VLLMValidationError``, which its OpenAI server answers with
HTTP 400 and an error body, and the sampler in the worker only ever sees valid options. Kept out
of ``sirius.py`` so the API server, which has no model runner, does not import the drafter.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from slimserve.plugin.vllm.sirius_settings import REQUEST_KEY, SUPPORTED_VLLM, SiriusSettings, check_request_option


def install(module: ModuleType) -> bool:
    """Wrap ``module.InputProcessor._validate_params`` (idempotent); False on an unsupported vLLM."""
    import vllm
    from vllm.exceptions import VLLMValidationError

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        return False
    processor = module.InputProcessor
    original = processor._validate_params
    if getattr(original, "checks_sirius_option", False):
        return True

    @functools.wraps(original)
    def validate(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            check_request_option(getattr(params, "extra_args", None), SiriusSettings.of(self.vllm_config))
        except ValueError as error:
            raise VLLMValidationError(str(error), parameter=f"vllm_xargs.{REQUEST_KEY}") from None
        return original(self, params, *args, **kwargs)

    validate.checks_sirius_option = True  # type: ignore[attr-defined]
    processor._validate_params = validate
    return True

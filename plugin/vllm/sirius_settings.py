"""Sirius's per-server settings and how they become vLLM engine arguments (importable without vLLM).

Kept apart from ``sirius.py`` (the drafter and sampler, which import vLLM's runner internals) so
the command line can build and check them cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slimserve.errors import SlimserveError

#: Key of Sirius's settings in vLLM's ``additional_config`` (engine argument ``--additional-config``).
CONFIG_KEY = "slimserve_sirius"
#: The vLLM release whose runner, drafter and rejection-sampler internals this module was written against.
SUPPORTED_VLLM = "0.32."
DEFAULT_PERIOD = 16
DEFAULT_THRESHOLD = 0.1
#: The paper's temperature for the full model's likelihood of a draft token (hard-coded in its code too).
LIKELIHOOD_TEMPERATURE = 0.6
#: A request's own Sirius option, in its sampling parameters' ``extra_args`` (OpenAI API: ``"vllm_xargs"``).
REQUEST_KEY = "sirius"
#: The value of ``REQUEST_KEY`` that turns Sirius's acceptance off for one request.
REQUEST_OFF = "off"


@dataclass(frozen=True)
class SiriusSettings:
    """One server's Sirius settings.

    ``period`` K: the full model checks every K tokens, so the drafter proposes K − 1.
    ``threshold``: the paper's acceptance rule (a draft token stays while the full model gives it
    probability ≥ threshold at temperature 0.6); ``lossless`` uses vLLM's exact greedy check instead.
    ``sparse``: how the drafter is sparse. None: the checkpoint's own R-Sparse layers. ``"cats:s"``:
    CATS-style MLP activation sparsity on any (dense) checkpoint: each token keeps the ``1 − s``
    fraction of its gate activations ``silu(x W_gate)`` largest in magnitude and zeroes the rest.
    """

    period: int = DEFAULT_PERIOD
    threshold: float = DEFAULT_THRESHOLD
    lossless: bool = False
    sparse: str | None = None

    def __post_init__(self) -> None:
        if self.period < 2:
            raise SlimserveError("must be at least 2 (one draft token per check)", field="sirius.period",
                                 expected=f"an integer >= 2, got {self.period}")
        if self.threshold < 0:
            raise SlimserveError("must not be negative", field="sirius.threshold",
                                 expected=f"a probability threshold >= 0, got {self.threshold}")
        if self.sparse is not None:
            self.cats_sparsity  # noqa: B018  (validates)

    @property
    def cats_sparsity(self) -> float | None:
        """The fraction of MLP activations the CATS drafter zeroes, or None for R-Sparse layers."""
        if self.sparse is None:
            return None
        method, _, value = self.sparse.partition(":")
        try:
            sparsity = float(value)
        except ValueError:
            sparsity = -1.0
        if method != "cats" or not 0.0 < sparsity < 1.0:
            raise SlimserveError("unknown drafter sparsity", field="sirius.sparse",
                                 expected=f"'cats:s' with 0 < s < 1 (e.g. cats:0.5), got {self.sparse!r}")
        return sparsity

    def drafter_density(self, modules: Mapping[str, Mapping[str, Any]]) -> float:
        """Share of activations the drafter keeps in its sparse layers (the ``sirius_drafter_density`` gauge).

        CATS keeps ``1 − s`` of every MLP's activations. An R-Sparse drafter keeps ``1 − s`` of each
        ``rsparse`` module's inputs, averaged weighted by the module's weight size (``modules`` is the
        checkpoint's ``quantization_config["modules"]``); a checkpoint without rsparse modules drafts
        densely (1.0), which is what the dense-drafter tests rely on.
        """
        if self.cats_sparsity is not None:
            return 1.0 - self.cats_sparsity
        sizes = [(spec["in_features"] * spec["out_features"], float(spec["sparsity"]))
                 for spec in modules.values() if spec.get("scheme") == "rsparse"]
        total = sum(size for size, _ in sizes)
        return sum(size * (1.0 - sparsity) for size, sparsity in sizes) / total if total else 1.0

    def engine_args(self, model: str) -> dict[str, Any]:
        """The vLLM engine arguments that turn Sirius on for ``model`` (``LLM(**...)``, ``EngineArgs``).

        Checks the installed vLLM first: on another release the plugin leaves vLLM's drafter in
        place, which would load a second copy of the model and draft densely.
        """
        import vllm

        check_vllm_version(vllm.__version__)
        return {
            "speculative_config": {"method": "draft_model", "model": model,
                                   "num_speculative_tokens": self.period - 1},
            "additional_config": {CONFIG_KEY: {"period": self.period, "threshold": self.threshold,
                                               "lossless": self.lossless, "sparse": self.sparse}},
        }

    @property
    def default_threshold(self) -> float | None:
        """The acceptance threshold of a request that says nothing; None is exact (lossless) acceptance."""
        return None if self.lossless else self.threshold

    @classmethod
    def of(cls, vllm_config: Any) -> SiriusSettings | None:
        """The settings an engine runs with, or None where Sirius is off."""
        extra = getattr(vllm_config, "additional_config", None)
        if not isinstance(extra, dict) or CONFIG_KEY not in extra:
            return None
        return cls(**extra[CONFIG_KEY])


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM whose internals Sirius was not written against, before it reaches a runner."""
    if not version.startswith(SUPPORTED_VLLM):
        raise SlimserveError(
            "Sirius replaces vLLM's draft-model proposer and rejection sampler, internals that change "
            "between releases", field="vllm version",
            expected=f"vLLM {SUPPORTED_VLLM}x, found {version}")


def vllm_cli_args(model: str, settings: SiriusSettings) -> list[str]:
    """``settings.engine_args`` as options of vLLM's OpenAI server (JSON values, as its parser takes them)."""
    import json

    engine = settings.engine_args(model)
    return ["--speculative-config", json.dumps(engine["speculative_config"]),
            "--additional-config", json.dumps(engine["additional_config"])]


def request_threshold(extra_args: Mapping[str, Any] | None, default: float | None) -> float | None:
    """One request's acceptance threshold: its own ``sirius`` option, else the server's ``default``.

    ``"off"`` is exact acceptance (None): the request's tokens are exactly the full model's greedy
    tokens, as with ``--sirius-lossless``; vLLM 0.32 drafts for every request of a speculative batch,
    so its drafts are still computed, only never kept unchecked. A number ``>= 0`` is that request's
    threshold. Anything else raises ``ValueError`` naming the field, which vLLM answers with HTTP 400
    before the request is scheduled.
    """
    if not extra_args or REQUEST_KEY not in extra_args:
        return default
    value = extra_args[REQUEST_KEY]
    if value == REQUEST_OFF:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    raise ValueError(f"vllm_xargs.{REQUEST_KEY}: expected \"{REQUEST_OFF}\" or an acceptance threshold >= 0 "
                     f"(a number), got {value!r}")


def check_request_option(extra_args: Mapping[str, Any] | None, settings: SiriusSettings | None) -> None:
    """Refuse (``ValueError``) a request's ``sirius`` option that is malformed or sent to a server without Sirius."""
    if not extra_args or REQUEST_KEY not in extra_args:
        return
    if settings is None:
        raise ValueError(f"vllm_xargs.{REQUEST_KEY}: Sirius is off on this server (start it with --sirius-period, "
                         "--sirius-threshold or --sirius-lossless to use it)")
    request_threshold(extra_args, None)

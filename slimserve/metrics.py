"""slimserve's Prometheus metrics: names, meanings and buckets, defined once.

Two producers feed these families: slimserve's FastAPI app (diffusers pipelines and the
diffusion LM, ``slimserve.server``) and the vLLM stat-logger plugin
(``slimserve.plugin.stat_logger``) that copies vLLM's per-iteration statistics into them.
Both import this module, which depends on ``prometheus_client`` only, so the FastAPI server
does not pay vLLM's import time and ``plugin`` never imports ``server``.

Names mirror vLLM's (``docs/methods/serving.md``, "Metric names") with a ``slimserve:`` prefix, so
a dashboard written for one engine works for every engine. vLLM unregisters every collector
named ``vllm:*`` when it builds its own logger, which is another reason not to reuse its prefix.
Buckets are vLLM's, so SLO thresholds are bucket boundaries on both kinds of server.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "slimserve:"

# vLLM's buckets (loggers.py), kept identical so that SLO thresholds line up across engines.
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
INTER_TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)
# A denoising step of a DiT ranges from milliseconds (tiny models) to tens of seconds (14B video).
DENOISE_STEP_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)

# Fractions of attention tiles computed (1 = dense).
DENSITY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class SlimserveMetrics:
    """Every ``slimserve:`` metric family, bound to one model name on one registry.

    The FastAPI app gives each app instance its own registry (several apps may live in one
    test process); the vLLM stat logger uses the process-wide ``REGISTRY`` that vLLM's
    ``/metrics`` route exposes.
    """

    def __init__(self, model_name: str, registry: CollectorRegistry = REGISTRY) -> None:
        labels = ["model_name"]

        # Families labelled by model name only come back bound to this model.
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=registry).labels(model_name)

        def counter_by(name: str, doc: str, label: str) -> Counter:
            return Counter(PREFIX + name, doc, [*labels, label], registry=registry)

        self.model_name = model_name
        # Latency, with vLLM's meanings.
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first generated content.",
            TIME_TO_FIRST_TOKEN_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive streamed outputs of one request.",
            INTER_TOKEN_LATENCY_BUCKETS)
        self.time_per_output_token = histogram(
            "request_time_per_output_token_seconds",
            "Per request: (e2e latency - time to first token) / (generated tokens - 1).",
            INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last byte of the result.",
            REQUEST_LATENCY_BUCKETS)
        self.request_queue_time = histogram(
            "request_queue_time_seconds", "Time a request waited for a free engine slot.",
            REQUEST_LATENCY_BUCKETS)
        self.request_inference_time = histogram(
            "request_inference_time_seconds", "Time a request spent running on the engine.",
            REQUEST_LATENCY_BUCKETS)
        self.denoise_step = histogram(
            "denoise_step_seconds", "Duration of one denoising step (diffusion pipelines and diffusion LMs).",
            DENOISE_STEP_BUCKETS)
        # Load.
        self.num_requests_running = gauge("num_requests_running", "Requests running on the engine.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting for an engine slot.")
        # Work done.
        self.prompt_tokens = counter("prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.generated_images = counter("generated_images", "Images generated.")
        self.generated_video_frames = counter("generated_video_frames", "Video frames generated.")
        self._request_success = counter_by(
            "request_success", "Finished requests, by finish reason (stop, length, abort, ...).", "finished_reason")
        self._admission_rejections = counter_by(
            "admission_rejections", "Requests refused before running, by reason (queue_full, ...).", "reason")
        # What the sparse methods save.
        self.attention_density = gauge(
            "attention_density",
            "Fraction of attention score entries computed under the active sparse-attention schedule (1 = dense).",
        )
        self.attention_skipped_heads = gauge(
            "attention_skipped_heads", "Attention heads the active schedule skips or reuses instead of computing.",
        )
        self.model_compression_ratio = gauge(
            "model_compression_ratio",
            "Fraction of decoder-linear parameters the loaded checkpoint removed (0 = dense).",
        )
        self.sparsed_kept_density = histogram(
            "sparsed_kept_density",
            "Per SparseD request: fraction of (query block, key block) attention tiles kept, over layers and heads.",
            DENSITY_BUCKETS)
        self.sparsed_selection_seconds = histogram(
            "sparsed_mask_selection_seconds",
            "Per SparseD request: time spent scoring tiles and building block masks (once per layer).",
            DENOISE_STEP_BUCKETS)
        self.sirius_advances = counter(
            "sirius_advances", "Sirius correction rounds (drafts verified); pair with sirius_advance_tokens.",
        )
        self.sirius_advance_tokens = counter(
            "sirius_advance_tokens",
            "Tokens committed by Sirius rounds; rate(sirius_advance_tokens)/rate(sirius_advances) is the mean "
            "advance length.",
        )
        self.sirius_corrections = counter(
            "sirius_corrections",
            "Sirius rounds in which the full model refused a draft token and put its own in its place; divide by "
            "sirius_advance_tokens for corrections per generated token.",
        )
        self.sirius_rollback_tokens = counter(
            "sirius_rollback_tokens",
            "Draft tokens Sirius rolled back; divide by sirius_corrections for the mean rollback length.",
        )
        self.sirius_drafter_density = gauge(
            "sirius_drafter_density",
            "Share of activations the Sirius drafter keeps in its sparse layers (R-Sparse: 1 - s weighted by layer "
            "size; CATS: 1 - s of the MLP activations); 1 = a dense drafter. Set only when Sirius is on.",
        )
        self.attention_density.set(1.0)

    def request_success(self, finished_reason: str) -> None:
        """Count one finished request under its OpenAI/vLLM finish reason."""
        self._request_success.labels(self.model_name, finished_reason).inc()

    def admission_rejection(self, reason: str) -> None:
        """Count one request refused before it ran (e.g. a full queue answered with 429)."""
        self._admission_rejections.labels(self.model_name, reason).inc()

    def observe_finished_text(self, *, e2e: float, ttft: float | None, generated_tokens: int) -> None:
        """Record the per-request latencies of a finished text request (vLLM's TPOT definition)."""
        self.e2e_request_latency.observe(e2e)
        if ttft is not None and generated_tokens > 1:
            self.time_per_output_token.observe((e2e - ttft) / (generated_tokens - 1))


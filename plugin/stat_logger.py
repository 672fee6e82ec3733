"""The vLLM stat-logger plugin that puts slimserve's metrics on vLLM's ``/metrics``.

Registered under the ``vllm.stat_logger_plugins`` entry point group. vLLM loads it in the
API-server process of its OpenAI server (AsyncLLM only; the offline ``LLM`` ignores the
group) and calls ``record()`` with every batch of engine statistics. The plugin copies them
into the ``slimserve:`` families of ``slimserve.metrics``, so the dashboards and alerts
written for slimserve's own server also work for causal LMs served by vLLM, and it sets the
gauges only slimserve knows: the compression ratio of the loaded checkpoint and, when vLLM
runs slimserve's Sirius correction through its speculative-decoding path, the drafter's density.
"""

from __future__ import annotations

from pathlib import Path

from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats

from slimserve.loaders.checkpoint import compression_summary, open_checkpoint
from slimserve.metrics import SlimserveMetrics
from slimserve.plugin.vllm.sirius_settings import SiriusSettings

# One set of families per served model and process: vLLM may build a logger per engine
# index, and prometheus_client refuses to register a family twice.
_METRICS_BY_MODEL: dict[str, SlimserveMetrics] = {}


def _metrics_for(model_name: str) -> SlimserveMetrics:
    if model_name not in _METRICS_BY_MODEL:
        _METRICS_BY_MODEL[model_name] = SlimserveMetrics(model_name)
    return _METRICS_BY_MODEL[model_name]


def compression_ratio(model_dir: str | Path) -> float:
    """Fraction of parameters the checkpoint in ``model_dir`` removed; 0.0 for a dense model.

    Folders without a root ``config.json`` (diffusers pipelines) count as dense.
    """
    if not (Path(model_dir) / "config.json").is_file():
        return 0.0
    return float(compression_summary(model_dir)["ratio"])


def checkpoint_modules(model_dir: str | Path) -> dict[str, dict]:
    """The ``quantization_config["modules"]`` of a slimserve checkpoint; empty for a plain model or pipeline."""
    if not (Path(model_dir) / "config.json").is_file():
        return {}
    return open_checkpoint(model_dir).modules


class SlimserveStatLogger(StatLoggerBase):
    """Mirror vLLM's per-iteration statistics into ``slimserve:`` metrics."""

    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0) -> None:
        model_config = vllm_config.model_config
        self.metrics = _metrics_for(str(model_config.served_model_name))
        self.metrics.model_compression_ratio.set(compression_ratio(model_config.model))
        # vLLM's CPU and GPU paths run causal attention densely.
        self.metrics.attention_density.set(1.0)
        self.metrics.attention_skipped_heads.set(0)
        sirius = SiriusSettings.of(vllm_config)
        self.counts_sirius = sirius is not None
        if sirius is not None:
            self.metrics.sirius_drafter_density.set(sirius.drafter_density(checkpoint_modules(model_config.model)))

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: MultiModalCacheStats | None = None,
        engine_idx: int = 0,
    ) -> None:
        """Copy one batch of engine statistics (vLLM calls this after every engine step)."""
        metrics = self.metrics
        if scheduler_stats is not None:
            metrics.num_requests_running.set(scheduler_stats.num_running_reqs)
            metrics.num_requests_waiting.set(scheduler_stats.num_waiting_reqs)
            spec = scheduler_stats.spec_decoding_stats
            if self.counts_sirius and spec is not None and spec.num_drafts:
                # Each round commits its accepted draft tokens plus the verifier's own token.
                metrics.sirius_advances.inc(spec.num_drafts)
                metrics.sirius_advance_tokens.inc(spec.num_accepted_tokens + spec.num_drafts)
                metrics.sirius_rollback_tokens.inc(spec.num_draft_tokens - spec.num_accepted_tokens)
                # A round all of whose drafts were kept reached the last draft position (every round drafts K − 1,
                # except near max_model_len, where a shortened round counts as corrected).
                kept_all = spec.num_accepted_tokens_per_pos[-1] if spec.num_accepted_tokens_per_pos else 0
                metrics.sirius_corrections.inc(spec.num_drafts - kept_all)
        if iteration_stats is None:
            return
        metrics.prompt_tokens.inc(iteration_stats.num_prompt_tokens)
        metrics.generation_tokens.inc(iteration_stats.num_generation_tokens)
        for ttft in iteration_stats.time_to_first_tokens_iter:
            metrics.time_to_first_token.observe(ttft)
        for itl in iteration_stats.inter_token_latencies_iter:
            metrics.inter_token_latency.observe(itl)
        for finished in iteration_stats.finished_requests:
            metrics.request_success(str(finished.finish_reason))
            metrics.e2e_request_latency.observe(finished.e2e_latency)
            metrics.request_queue_time.observe(finished.queued_time)
            metrics.request_inference_time.observe(finished.inference_time)
            if finished.num_generation_tokens > 1:
                metrics.time_per_output_token.observe(finished.mean_time_per_output_token)

    def log_engine_initialized(self) -> None:
        """Nothing to log: the gauges were set when vLLM built the logger."""

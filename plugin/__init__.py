"""How engines run slimserve checkpoints: the vLLM general plugin and diffusers hooks.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it once in every
process (API server, engine core, each worker), so it must be idempotent and cheap.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

#: The module whose ``DraftModelProposer`` name vLLM's model runner (GPU and CPU) builds its drafter from.
RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"

#: The module of vLLM's ``InputProcessor``, which checks every request in the API server process.
INPUT_PROCESSOR_MODULE = "vllm.v1.engine.input_processor"

_registered = False


def register() -> None:
    """Register slimserve's quantization method (weight schemes) with vLLM; arm Sirius's drafter and, in workers,
    the idle heap trim."""
    global _registered
    if _registered:
        return
    from slimserve.plugin.vllm import config  # noqa: F401  (decorator registers "slimserve")

    after_import(RUNNER_MODULE, _in_worker)
    after_import(INPUT_PROCESSOR_MODULE, _install_sirius_request_check)
    _registered = True


def _in_worker(runner_module: ModuleType) -> None:
    """What only worker processes (the ones that import the model runner) need: Sirius's drafter, and a watcher that
    returns the heap pages serving freed once the worker goes idle (vllm/heap.py), dense checkpoints' workers too."""
    from slimserve.plugin.vllm.heap import start_idle_trim
    from slimserve.plugin.vllm.sirius import install

    install(runner_module)
    start_idle_trim()


def _install_sirius_request_check(input_processor_module: ModuleType) -> None:
    from slimserve.plugin.vllm.sirius_requests import install

    install(input_processor_module)


def after_import(name: str, then: Callable[[ModuleType], None]) -> None:
    """Call ``then(module)`` once module ``name`` is imported: now if it already is, else when it finishes loading.

    Sirius's drafter replaces a name in vLLM's model-runner module. Importing that module (and the
    drafter, which imports vLLM's speculative-decoding stack) costs seconds of CPU; only worker
    processes need it, and they import it anyway. The API server never does, so it pays nothing.
    """
    module = sys.modules.get(name)
    if module is not None:
        then(module)
        return
    sys.meta_path.insert(0, _AfterImport(name, then))


class _AfterImport(MetaPathFinder):
    """One-shot import hook: finds ``name`` with the other finders and runs ``then`` after its code ran."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot, and the lookup below must not find this hook again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module
        then = self.then

        def exec_module(module: ModuleType) -> None:
            load(module)
            then(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's own loader instance
        return spec

"""How engines run slimserve checkpoints: the vLLM general plugin and diffusers hooks.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it once in every
process (API server, engine core, each worker), so it must be idempotent and cheap.
"""

_registered = False


def register() -> None:
    """Register slimserve's quantization method (weight schemes) with vLLM."""
    global _registered
    if _registered:
        return
    from slimserve.plugin.vllm import config  # noqa: F401  (decorator registers "slimserve")
    from slimserve.plugin.vllm.sirius import install

    install()  # Sirius's drafter for the draft_model method (plugin/vllm/sirius.py)
    _registered = True

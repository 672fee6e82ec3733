"""Test infrastructure in one package: tiny models, live servers, the trivial engine, reference runs.

Nothing can be downloaded from a model hub here, so tests, the load test and the benchmarks
build their own tiny models and start real servers on loopback. Shipped code (``server``,
``plugin``, ``loaders``, ``attention``) never imports this package; it sits above them all.

- ``models``: the shared byte-level BPE tokenizer, tiny random-weight Llama and Qwen3 causal LMs.
- ``vllm``: greedy token ids (and chat answers) from real vLLM in a fresh process, and from transformers.
- ``diffusers``: tiny video transformers (Wan, HunyuanVideo, CogVideoX) with inputs; tiny PixArt-Sigma and Wan
  pipeline folders.
- ``diffusion_lm``: a tiny masked-diffusion LM folder for the server's own text engine.
- ``dlm``: tiny LLaDA and Dream checkpoints in their original tensor naming, with their reference models.
- ``edit``: damaged copies of a checkpoint (tensors or config.json edited).
- ``rocket_layout``: ROCKET's checkpoint layout written from a dense model, for converter and plugin tests.
- ``live``: a FastAPI app on a thread or ``slimserve serve`` as a child process, always stopped.
- ``trivial``: a model-free engine that isolates the HTTP layer.
- ``metrics``: one sample out of a Prometheus text exposition.

Import from the submodule that names the concept; this file imports none of them, so importing one
(say, the causal-LM builders) costs neither diffusers nor FastAPI nor vLLM.
"""

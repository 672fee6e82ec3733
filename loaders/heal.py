"""``slimserve heal``: distil the dense model into a compressed checkpoint's stored factors.

Compression fits every layer on its own; the errors compound through the depth and nothing
repairs them. Healing trains the compressed model (its schemes' reference forwards,
``loaders/reference.py``) to predict the dense teacher's next-token distributions: the loss is
the forward KL(teacher ‖ student) on the logits at temperature 1 (the loss the AST ablation found
best on small models), optionally plus a hidden-state MSE on the last hidden states.

Only the stored float factors train, on their fixed support: lowrank ``u``/``v``, dictsparse
``dictionary`` and ``coef_values`` (the coefficient indices stay), N:M ``values`` (the packed
positions stay), lowrank_sparse ``u``/``v`` and S's ``s_values`` (its indices or mask stay; a
pruned, rank-0 layer trains only its kept weights). Schemes, shapes, ranks, index tensors and
sparsity patterns never change, so the healed checkpoint serves through the same kernels. Not
trained: modules kept dense, embeddings and norms (they were not damaged), and rsparse modules
(their thresholds were searched on the dense weights and their sparse forward is not a product
with one weight).

Resumable: the trained factors, the optimizer state and the step are saved beside OUT
(``OUT.heal-state.pt``); batch i is drawn from a generator seeded by ``(seed, i)``, so a resumed
run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from slimserve.errors import CompressionError
from slimserve.loaders.checkpoint import Checkpoint, CheckpointWriter, copy_aux_files, iter_tensors, open_checkpoint
from slimserve.loaders.reference import SchemeLinear, reference_model
from slimserve.loaders.schemes import SCHEMES
from slimserve.loaders.windows import bos_token_id

# The float tensors healing trains, per scheme; every other tensor is copied unchanged.
TRAINED_TENSORS: dict[str, tuple[str, ...]] = {"lowrank": ("u", "v"), "dictsparse": ("dictionary", "coef_values"),
                                               "nm": ("values",), "lowrank_sparse": ("u", "v", "s_values")}
STATE_SUFFIX = ".heal-state.pt"
# Report files of ``compress`` carried over to the healed checkpoint.
REPORT_FILES = ("slimserve_report.json", "slimserve_report.png")


@dataclass(frozen=True)
class HealSettings:
    """How to heal; everything but ``steps`` must match for ``--resume`` to continue a saved run."""

    steps: int
    lr: float = 1e-4
    seq_len: int = 256
    batch: int = 4
    seed: int = 0
    eval_every: int = 50
    eval_windows: int = 4
    save_every: int = 50
    hidden_weight: float = 0.0
    held_out_fraction: float = 0.1

    def check(self) -> None:
        for name in ("steps", "seq_len", "batch", "eval_every", "eval_windows", "save_every"):
            if getattr(self, name) <= 0 and not (name == "steps" and self.steps == 0):
                raise CompressionError(f"heal --{name.replace('_', '-')} {getattr(self, name)}: expected a positive "
                                       "integer")
        if not self.lr > 0 or self.hidden_weight < 0 or not 0 < self.held_out_fraction < 1:
            raise CompressionError(f"heal settings out of range: lr {self.lr} (> 0), hidden weight "
                                   f"{self.hidden_weight} (>= 0), held-out fraction {self.held_out_fraction} (0..1)")

    def resumable_part(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("steps", "eval_every", "save_every")}


@dataclass
class HealResult:
    path: Path
    steps: int
    # (step, mean training loss over the steps since the previous entry)
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    # (step, held-out KL) every eval_every steps, step 0 = before healing
    held_out: list[tuple[int, float]] = field(default_factory=list)
    # held-out KL of the factors as written (rounded to the checkpoint's dtype)
    held_out_written: float = math.nan


def state_path(out: str | Path) -> Path:
    """Where the resumable state of a heal writing ``out`` lives (beside it, not inside it)."""
    out = Path(out)
    return out.parent / f"{out.name}{STATE_SUFFIX}"


def trainable_tensors(ckpt: Checkpoint) -> list[tuple[str, str]]:
    """``(module, tensor suffix)`` of every stored float factor healing trains, in module order."""
    empty = {(module, t.suffix) for module, spec in ckpt.modules.items() if spec["scheme"] in TRAINED_TENSORS
             for t in SCHEMES[spec["scheme"]].tensor_specs(spec) if 0 in t.shape}  # e.g. rank 0's u and v
    return [(module, suffix) for module, spec in ckpt.modules.items()
            for suffix in TRAINED_TENSORS.get(spec["scheme"], ()) if (module, suffix) not in empty]


class _Data:
    """Training windows drawn per step from the text's first part; held-out windows from its last part."""

    def __init__(self, tokenizer, text_file: Path, settings: HealSettings) -> None:
        ids = tokenizer(text_file.read_text(), add_special_tokens=False).input_ids
        held = max(int(len(ids) * settings.held_out_fraction), settings.eval_windows * settings.seq_len)
        if len(ids) - held < 2 * settings.seq_len:
            raise CompressionError(f"--text {text_file}: {len(ids)} tokens are too few to heal with --seq-len "
                                   f"{settings.seq_len} ({held} held out, and at least twice --seq-len to train on)")
        self.bos = bos_token_id(tokenizer)
        self.train = torch.tensor(ids[:-held])
        tail = ids[-held:]
        self.held_out = [torch.tensor([self.bos] + tail[w * settings.seq_len:(w + 1) * settings.seq_len])
                         for w in range(settings.eval_windows)]
        self.settings = settings

    def batch(self, step: int) -> torch.Tensor:
        """Batch ``step`` (``[batch, 1 + seq_len]``, BOS first): a function of the seed and the step only."""
        s = self.settings
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - s.seq_len + 1, (s.batch,), generator=generator)
        rows = [torch.cat([torch.tensor([self.bos]), self.train[i:i + s.seq_len]]) for i in starts.tolist()]
        return torch.stack(rows)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of the forward KL(teacher ‖ student) of the next-token distributions (T = 1)."""
    teacher = teacher_logits.float().log_softmax(-1)
    student = student_logits.float().log_softmax(-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _loss(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor, hidden_weight: float) -> torch.Tensor:
    with torch.no_grad():
        target = teacher(ids, output_hidden_states=hidden_weight > 0)
    out = student(ids, output_hidden_states=hidden_weight > 0)
    loss = distillation_loss(out.logits, target.logits)
    if hidden_weight > 0:
        reference = target.hidden_states[-1]
        loss = loss + hidden_weight * (out.hidden_states[-1] - reference).square().mean() / \
            reference.square().mean().clamp_min(1e-30)
    return loss


def held_out_loss(student: torch.nn.Module, teacher: torch.nn.Module, windows: list[torch.Tensor]) -> float:
    """Mean distillation KL over the held-out windows (no hidden-state term: comparable across settings)."""
    with torch.no_grad():
        return sum(float(_loss(student, teacher, w[None], 0.0)) for w in windows) / len(windows)


def heal(ckpt_dir: str | Path, out: str | Path, *, teacher: str | Path, text: str | Path, settings: HealSettings,
         resume: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> HealResult:
    """Distil ``teacher`` (the dense model) into ``ckpt_dir``'s stored factors; write the healed checkpoint to ``out``.

    With ``resume`` the run continues from ``OUT.heal-state.pt`` (same checkpoint, teacher, text and
    settings except ``steps``) up to ``settings.steps``.
    """
    from transformers import AutoTokenizer

    settings.check()
    ckpt_dir, out, text = Path(ckpt_dir), Path(out), Path(text)
    if out.resolve() == ckpt_dir.resolve():
        raise CompressionError(f"heal OUT {out} is the checkpoint being healed; write the healed one elsewhere")
    if not text.is_file():
        raise CompressionError(f"--text {text}: file not found")
    ckpt = open_checkpoint(ckpt_dir)
    if ckpt.quantization_config is None:
        raise CompressionError(f"{ckpt_dir} is a dense model, not a slimserve checkpoint: nothing to heal")
    if open_checkpoint(teacher).quantization_config is not None:
        raise CompressionError(f"--teacher {teacher} is a compressed checkpoint; give the dense model it came from")
    trained = trainable_tensors(ckpt)
    if not trained:
        raise CompressionError(f"{ckpt_dir}: no module stores trainable factors (schemes "
                               f"{sorted({s['scheme'] for s in ckpt.modules.values()})}; healing trains "
                               f"{', '.join(TRAINED_TENSORS)})")
    torch.manual_seed(settings.seed)
    data = _Data(AutoTokenizer.from_pretrained(str(teacher)), text, settings)
    teacher_model = reference_model(teacher).requires_grad_(False)
    student = reference_model(ckpt_dir).requires_grad_(False)
    params = _make_trainable(student, trained)
    optimizer = torch.optim.AdamW(list(params.values()), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    identity = {"checkpoint": _fingerprint(ckpt_dir), "teacher": str(Path(teacher).resolve()),
                "text_sha256": hashlib.sha256(text.read_bytes()).hexdigest(), **settings.resumable_part()}
    result = HealResult(path=out, steps=settings.steps)
    start = 0
    if resume:
        start = _load_state(state_path(out), identity, params, optimizer, result)
        log(f"resuming at step {start} of {settings.steps} from {state_path(out)}")
    if start == 0:
        result.held_out.append((0, held_out_loss(student, teacher_model, data.held_out)))
        log(f"held-out KL before healing: {result.held_out[-1][1]:.4f}")
    running, count = 0.0, 0
    bar = tqdm(range(start, settings.steps), desc="heal", disable=not progress, initial=start, total=settings.steps)
    for step in bar:
        loss = _loss(student, teacher_model, data.batch(step), settings.hidden_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        value = loss.item()
        running, count = running + value, count + 1
        bar.set_postfix(loss=f"{value:.4f}")
        done = step + 1
        if done % settings.eval_every == 0 or done == settings.steps:
            result.train_loss.append((done, running / count))
            running, count = 0.0, 0
            result.held_out.append((done, held_out_loss(student, teacher_model, data.held_out)))
            (bar.write if progress else log)(f"step {done}: train loss {result.train_loss[-1][1]:.4f}, "
                                             f"held-out KL {result.held_out[-1][1]:.4f}")
        if done % settings.save_every == 0 or done == settings.steps:
            _save_state(state_path(out), identity, done, params, optimizer, result)
    bar.close()
    _write(ckpt, out, params, settings, teacher, text, result)
    # What serving will compute: the factors rounded to the checkpoint's dtype.
    dtype = ckpt.float_dtype or torch.float32
    with torch.no_grad():
        for p in params.values():
            p.copy_(p.to(dtype).float())
    result.held_out_written = held_out_loss(student, teacher_model, data.held_out)
    log(f"held-out KL as written ({str(dtype).removeprefix('torch.')}): {result.held_out_written:.4f}")
    return result


def _make_trainable(model: torch.nn.Module, trained: list[tuple[str, str]]) -> dict[str, torch.nn.Parameter]:
    """Turn each trained stored tensor into a float32 Parameter in place; its module then multiplies by Ŵ.

    A trained module's forward becomes ``x·Ŵᵀ`` with Ŵ its scheme's (differentiable) dense
    reconstruction: the same product as its reference forward for these schemes, without
    dictsparse's gather of ``[tokens, out, s]`` that autograd would keep for every layer.
    """
    named = dict(model.named_modules())
    params: dict[str, torch.nn.Parameter] = {}
    for module, suffix in trained:
        layer = named[module]
        if not isinstance(layer, SchemeLinear):
            raise CompressionError(f"{module}: expected a compressed module in the reference model")
        param = torch.nn.Parameter(layer.tensors[suffix].float().clone())
        layer.tensors = {**layer.tensors, suffix: param}
        layer.dense_prefill = True
        params[f"{module}.{suffix}"] = param
    return params


def _fingerprint(ckpt_dir: Path) -> str:
    """The healed checkpoint's identity for --resume: its config (schemes, shapes, producer)."""
    return hashlib.sha256((ckpt_dir / "config.json").read_bytes()).hexdigest()


def _save_state(path: Path, identity: dict, step: int, params: dict[str, torch.nn.Parameter],
                optimizer: torch.optim.Optimizer, result: HealResult) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"identity": identity, "step": step, "params": {k: p.detach().clone() for k, p in params.items()},
                "optimizer": optimizer.state_dict(), "train_loss": result.train_loss, "held_out": result.held_out},
               tmp)
    tmp.replace(path)


def _load_state(path: Path, identity: dict, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                result: HealResult) -> int:
    if not path.is_file():
        raise CompressionError(f"--resume: no saved heal state at {path}")
    state = torch.load(path, weights_only=True)
    if state["identity"] != identity:
        changed = sorted(k for k in identity if state["identity"].get(k) != identity[k])
        raise CompressionError(f"--resume: {path} was saved by a different run (differs in {', '.join(changed)})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    result.train_loss = [tuple(x) for x in state["train_loss"]]
    result.held_out = [tuple(x) for x in state["held_out"]]
    return int(state["step"])


def _write(ckpt: Checkpoint, out: Path, params: dict[str, torch.nn.Parameter], settings: HealSettings,
           teacher: str | Path, text: Path, result: HealResult) -> None:
    """The source checkpoint with the trained tensors replaced (in their stored dtype); producer gains ``heal``."""
    qc = ckpt.quantization_config
    producer = {**qc.get("producer", {}), "heal": {
        **asdict(settings), "teacher": Path(teacher).name, "text": text.name,
        "text_sha256": hashlib.sha256(text.read_bytes()).hexdigest(), "loss": "KL(teacher||student) on logits, T=1"
        + (f" + {settings.hidden_weight} x last-hidden MSE" if settings.hidden_weight else ""),
        "held_out_kl_before": result.held_out[0][1] if result.held_out and result.held_out[0][0] == 0 else None,
        "held_out_kl_after": result.held_out[-1][1] if result.held_out else None}}
    writer = CheckpointWriter(out, ckpt.config, producer=producer)
    module_tensors: dict[str, dict[str, torch.Tensor]] = {m: {} for m in ckpt.modules}
    for name, tensor in iter_tensors(ckpt):
        module = ckpt.module_of(name)
        if module is None:
            writer.add_tensor(name, tensor)
            continue
        trained = params.get(name)
        module_tensors[module][name[len(module) + 1:]] = \
            tensor if trained is None else trained.detach().to(tensor.dtype)
    for module, spec in ckpt.modules.items():
        fields = {k: v for k, v in spec.items() if k not in ("scheme", "in_features", "out_features")}
        writer.add_module(module, spec["scheme"], module_tensors[module], in_features=spec["in_features"],
                          out_features=spec["out_features"], **fields)
    writer.finish()
    copy_aux_files(ckpt.path, out)
    for report in REPORT_FILES:
        if (ckpt.path / report).is_file():
            shutil.copy2(ckpt.path / report, out / report)
    (out / "slimserve_heal.json").write_text(json.dumps(
        {"heal": producer["heal"], "train_loss": result.train_loss, "held_out": result.held_out}, indent=1) + "\n")

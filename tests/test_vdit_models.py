"""Sparse-vDiT on tiny random-weight Wan, HunyuanVideo and CogVideoX transformers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers.models import attention_processor
from diffusers.models.transformers import transformer_hunyuan_video, transformer_wan

from slimserve.attention.kernels import fused_attention
from slimserve.attention.patterns import Mode, PatternParams
from slimserve.attention.schedule import Schedule
from slimserve.errors import ScheduleError
from slimserve.plugin.diffusers import apply, search
from slimserve.testing.diffusers import tiny_inputs, tiny_transformer

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

KINDS = ["wan", "hunyuan", "cogvideox"]
# HunyuanVideo uses patch size 1, so a smaller frame keeps its sequence comparable; its text is
# padded (5 real of 8 tokens) so the padding mask is exercised.
SHAPES = {"wan": {}, "hunyuan": {"height": 8, "width": 8, "text_valid": 5}, "cogvideox": {}}
BLOCK = 16


def setup(kind: str, **overrides):
    model = tiny_transformer(kind)
    inputs = tiny_inputs(kind, model, **{**SHAPES[kind], **overrides})
    return model, inputs


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def searched(model, inputs, lam: float, eps: float) -> tuple[Schedule, torch.Tensor]:
    """Search on one forward and also return the output of that (greedy, sparse) forward."""
    outputs = []
    hook = model.register_forward_hook(lambda m, a, out: outputs.append(out.sample))
    try:
        schedule = search(model, None, lam=lam, eps=eps, block_size=BLOCK, backend="flex_eager", **inputs)
    finally:
        hook.remove()
    return schedule, outputs[0]


@pytest.mark.parametrize("kind", KINDS)
def test_eps_zero_is_bit_exact(kind):
    model, inputs = setup(kind)
    dense = run(model, inputs)
    schedule, _ = searched(model, inputs, lam=0.5, eps=0.0)
    assert {m for step in schedule.modes for layer in step for m in layer} == {Mode.FULL}
    installed = apply(model, schedule, backend="flex_eager")
    assert torch.equal(run(model, inputs), dense)
    installed.remove()
    assert torch.equal(run(model, inputs), dense)


class _Attention:
    """Stock processors' attention op replaced by the scheduled kernel: the reference.

    Lets the unmodified diffusers processor code (projections, norms, RoPE, text placement,
    output split) run around our kernel, so the Sparse-vDiT processors are checked against
    the stock code path rather than against themselves.
    """

    def __init__(self, schedule: Schedule, stock, layout_bshd: bool) -> None:
        self.schedule, self.stock, self.bshd = schedule, stock, layout_bshd
        self.layer = 0

    def __call__(self, query, key, value, attn_mask=None, **kwargs):
        if key.shape[1 if self.bshd else 2] != query.shape[1 if self.bshd else 2]:  # Wan cross-attention
            return self.stock(query, key, value, attn_mask=attn_mask, **kwargs)
        if not self.bshd and query.shape[2] != self.schedule.layout.seq_len:  # not a video self-attention
            return self.stock(query, key, value, attn_mask=attn_mask, **kwargs)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value)) if self.bshd else (query, key, value)
        key_valid = None
        if attn_mask is not None and not bool(attn_mask.all()):
            key_valid = attn_mask.reshape(attn_mask.shape[0], -1).sum(-1)
        s, layer = self.schedule, self.layer
        self.layer += 1
        out = fused_attention(q, k, v, s.modes_at(0, layer), s.layout, s.params, s.stripes_at(0, layer),
                              "flex_eager", key_valid)
        return out.transpose(1, 2) if self.bshd else out


class _Functional:
    def __init__(self, sdpa) -> None:
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name):
        return getattr(F, name)


@pytest.mark.parametrize("kind", KINDS)
def test_processors_match_stock_code_and_search_feeds_forward(kind, monkeypatch):
    model, inputs = setup(kind)
    dense = run(model, inputs)
    schedule, search_out = searched(model, inputs, lam=0.01, eps=10.0)
    used = {m for step in schedule.modes for layer in step for m in layer}
    assert Mode.FULL not in used and len(used) >= 2

    installed = apply(model, schedule, backend="flex_eager")
    sparse = run(model, inputs)
    installed.remove()
    # The search ran the chosen modes forward, so its output is the schedule's output ...
    torch.testing.assert_close(search_out, sparse, atol=1e-5, rtol=1e-5)
    # ... and not the dense one (it did not feed O_full forward).
    assert not torch.allclose(sparse, dense, atol=1e-3)

    if kind == "cogvideox":
        ref = _Attention(schedule, F.scaled_dot_product_attention, layout_bshd=False)
        monkeypatch.setattr(attention_processor, "F", _Functional(ref))
    else:
        module = transformer_wan if kind == "wan" else transformer_hunyuan_video
        ref = _Attention(schedule, module.dispatch_attention_fn, layout_bshd=True)
        monkeypatch.setattr(module, "dispatch_attention_fn", ref)
    reference = run(model, inputs)
    assert ref.layer == schedule.num_layers
    torch.testing.assert_close(sparse, reference, atol=1e-5, rtol=1e-5)


def test_schedule_survives_save_and_load(tmp_path):
    model, inputs = setup("cogvideox")
    schedule, _ = searched(model, inputs, lam=0.01, eps=10.0)
    path = schedule.save(tmp_path)
    assert path.name == "sparse_vdit_schedule.json"
    loaded = Schedule.load(tmp_path)
    assert loaded.to_json() == schedule.to_json()
    assert loaded.stripes == schedule.stripes and loaded.modes == schedule.modes
    installed = apply(model, schedule, backend="flex_eager")
    direct = run(model, inputs)
    installed.remove()
    installed = apply(model, path, backend="flex_eager")
    assert torch.equal(run(model, inputs), direct)
    installed.remove()
    report = loaded.report()
    assert "theoretical attention-FLOP reduction" in report and f"{schedule.density():.1%}" in report


def test_wrong_schedule_fails_clearly(tmp_path):
    wan, wan_inputs = setup("wan")
    schedule, _ = searched(wan, wan_inputs, lam=0.01, eps=10.0)

    with pytest.raises(ScheduleError, match="model_class.*WanTransformer3DModel.*CogVideoXTransformer3DModel"):
        apply(tiny_transformer("cogvideox"), schedule)
    with pytest.raises(ScheduleError, match="num_heads.*expected 2"):
        apply(tiny_transformer("wan", num_attention_heads=2), schedule)
    installed = apply(wan, schedule, backend="flex_eager")
    with pytest.raises(ScheduleError, match="layout.*num_frames=2"):
        run(wan, tiny_inputs("wan", wan, frames=2))
    installed.remove()

    data = schedule.to_json()
    data["modes"][0][1] = "FDX"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="bad.json, field 'modes', step 0, layer 1: got 'FDX'.*4 letters"):
        Schedule.load(tmp_path / "bad.json")
    data = schedule.to_json()
    data["modes"][0][0] = "VFFF"
    data["stripes"] = [s for s in data["stripes"] if (s["step"], s["layer"]) != (0, 0)]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="field 'stripes', step 0, layer 0, head 0: STRIPE head without columns"):
        Schedule.load(tmp_path / "bad.json")
    with pytest.raises(ScheduleError, match="no such file"):
        Schedule.load(tmp_path / "missing")


def test_density_counts_tiles():
    model, inputs = setup("wan")
    schedule, _ = searched(model, inputs, lam=0.5, eps=0.0)
    assert schedule.density() == 1.0
    schedule.modes[0][0] = [Mode.SKIP] * 4
    assert schedule.density() == pytest.approx(0.5)  # one of two layers skipped entirely
    schedule.modes[0][1] = [Mode.DIAGONAL] * 4
    per_frame = PatternParams.for_layout(schedule.layout, BLOCK)
    assert per_frame == schedule.params
    # 4 frames of 64 tokens, per-frame diagonal at 16-token tiles: one frame in four is computed.
    assert schedule.density() == pytest.approx(0.125)

"""Chat-model helpers for tests: a chat template for the tiny tokenizer and transformers' templated greedy reply."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# A ChatML-like template over the tiny tokenizer's own special tokens (models.train_tokenizer ships none).
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                      "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def with_chat_template(src: str | Path, dest: str | Path, template: str = TINY_CHAT_TEMPLATE) -> Path:
    """A copy of the model folder ``src`` at ``dest`` whose tokenizer carries ``template``."""
    from transformers import AutoTokenizer

    dest = Path(dest)
    shutil.copytree(src, dest)
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(dest))
    return dest


def hf_chat_reply(model_dir: str | Path, question: str, max_tokens: int) -> str:
    """transformers' float32 greedy reply to one user turn, chat template applied, stopping at EOS.

    What vLLM's ``LLM.chat`` with temperature 0 must return for the same model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(generated, skip_special_tokens=True)

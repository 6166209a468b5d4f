# frankly: CPU image by default; CUDA image with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
#   docker build -t frankly .
#   docker build -t frankly:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#   docker run -p 8000:8000 -v frankly-cache:/home/frankly/.cache/frankly frankly
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FRANKLY_HOST=0.0.0.0 FRANKLY_PORT=8000

# g++ builds frankly's int8 kernel for the CPU it runs on, on first use of int8 weights (the default,
# --weights auto, on an AVX2 CPU; cached in the volume below); without it int8 runs on torch's slower kernel.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 frankly
WORKDIR /app

# Dependencies in their own layer, before the source. Same install steps as the README:
# torch pinned first (from the CPU or CUDA index), then the project with the demo model extra.
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
RUN mkdir -p server directions && touch server/__init__.py directions/__init__.py \
    && pip install torch==2.13.0 -e ".[demo]" --extra-index-url ${TORCH_INDEX} \
    && rm -rf server directions

COPY server ./server
COPY directions ./directions
RUN pip install --no-deps -e . && chown -R frankly /app

USER frankly
RUN mkdir -p /home/frankly/.cache/frankly
VOLUME ["/home/frankly/.cache/frankly"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"
# The first start builds the int8 kernel (AVX2 CPUs, about 20 s) or converts the demo model to fp32
# (elsewhere, about a minute on two cores) into the cache volume.
CMD ["frankly", "serve", "--model", "demo"]

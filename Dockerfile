# The one runtime image of the Ray head and workers (cluster/*.yaml): CUDA 12.8, Python 3.12,
# torch (CUDA build), the distill package with its dependencies (Ray included), DeepSpeed.
#
#   docker build -t distill:latest .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu129 -t distill:latest .
#
# CUDA 12.8 is the oldest CUDA with Blackwell (RTX 5090) kernels, and runs on H100, L40S and
# A10G alike with an NVIDIA driver >= 570. Nothing but pip packages is fetched at build time:
# model weights and data are read by the jobs at run time.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# torch first, from the PyTorch index of the image's CUDA (pip would otherwise pick its own CUDA build)
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# openssh-client and rsync: the Ray cluster launcher runs and copies files through them, inside the container
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv openssh-client rsync ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A non-root user, ray. uid 1000 (the ubuntu user of the base image gives way) matches the SSH user
# of the cluster hosts, who owns the files Ray mounts into the container. HOME is set as an ENV
# because the Ray launcher reads it from the image to place its files.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --shell /bin/bash ray \
    && python3.12 -m venv /opt/venv \
    && chown -R ray:ray /opt/venv
ENV HOME=/home/ray \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
USER 1000:1000
WORKDIR /home/ray/distill

# setuptools: DeepSpeed builds with --no-build-isolation, against this environment
RUN pip install "setuptools>=77" \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The package's dependencies (ray[default,train,data] among them), read from pyproject.toml alone,
# so that editing the code does not reinstall them
COPY --chown=ray:ray pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# DeepSpeed is a source package that needs torch to build: as the Makefile does. No GPU here at
# build time, so name the accelerator; its CUDA ops are not prebuilt (the jobs use torch's AdamW).
RUN DS_ACCELERATOR=cuda DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed==0.19.8"

# The package itself (`ray job submit --working-dir .` ships newer code on top of it)
COPY --chown=ray:ray distill ./distill
COPY --chown=ray:ray jobs ./jobs
RUN pip install --no-deps . \
    && python -c "import distill, deepspeed, ray, torch; print('ray', ray.__version__, 'torch', torch.__version__)"

CMD ["bash"]

# lowbit in a container: installed by `make install` itself, running `lowbit run` as a non-root user.
#
# Build (needs BuildKit, the default builder since Docker 23, for the pip cache mount below):
#   docker build -t lowbit .                     # CPU: torch from the default index, as `make install`
#   docker build -t lowbit:cu128 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#                                                # CUDA: as `make install TORCH_INDEX=...`
# Run the pipeline on a checkout of this repository (params.yaml, dvc.yaml, .dvc/, .git) mounted at /work:
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/work" lowbit
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/work" lowbit lowbit show   # any other command
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -v "$PWD:/work" lowbit:cu128
# The image runs as the unprivileged user lowbit (uid 1000, gid 1000). Pass your own ids with --user:
# the mounted checkout is then writable, the outputs stay yours, and git (hence DVC and the lineage
# tags) accepts the repository, which it refuses when it is owned by another uid. HOME=/home/lowbit
# is writable by any uid (Prefect's local API database, caches), like /tmp.
#
# Pinned by Debian release, so that the apt packages below come from one release's archive.
FROM python:3.11-slim-trixie

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_DISABLE_TELEMETRY=1

# git: DVC and the lineage tags; make: the install below; g++: torch.compile's C++ backend
# (the ptq_int8_static_compiled variant compiles its graph on first use).
# DL3008 (pin apt versions) is ignored on purpose: Debian drops a superseded version from its
# archive when a security update lands, so an exact pin breaks the build within weeks; the
# release is fixed by the FROM tag, the Python environment by requirements.lock.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends git make g++ \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 lowbit \
 && useradd --uid 1000 --gid 1000 --no-log-init --create-home --home-dir /home/lowbit lowbit \
 && chmod 1777 /home/lowbit \
 && install -d -o 1000 -g 1000 /work

WORKDIR /opt/lowbit
COPY Makefile requirements.lock pyproject.toml README.md ./
COPY lowbit ./lowbit
COPY tasks ./tasks
COPY flows ./flows

# The install is the Makefile's own target, not a copy of its pip lines: the image and a
# `make install` checkout then install the same lock with the same pip flags by construction
# (tests/unit/test_dockerfile.py checks this wiring). TORCH_INDEX selects the CUDA wheel index
# exactly as the Makefile's TORCH_INDEX does; empty = the default index.
# pip's cache lives in a BuildKit cache mount: not in any layer, yet reused by the next build
# (this step reruns whenever the source changes, since the editable install needs the source).
ARG TORCH_INDEX=
RUN --mount=type=cache,target=/root/.cache/pip \
    make install VENV=/opt/venv TORCH_INDEX="$TORCH_INDEX"
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/lowbit

# Numeric, so that a runtime can verify runAsNonRoot; 1000:1000 is the lowbit user made above.
USER 1000:1000
WORKDIR /work
CMD ["lowbit", "run"]

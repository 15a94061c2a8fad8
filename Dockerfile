# lowbit on CPU: the same install as `make install`, the pipeline as the default command.
#   docker build -t lowbit .
#   docker run --rm -v "$PWD:/work" -w /work lowbit            # runs `lowbit run` on a checkout
# For a GPU image, build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim

ARG TORCH_INDEX=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_DISABLE_TELEMETRY=1

RUN apt-get update && apt-get install -y --no-install-recommends git make && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lowbit
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir ${TORCH_INDEX:+--extra-index-url $TORCH_INDEX} -r requirements.lock
COPY lowbit ./lowbit
COPY tasks ./tasks
COPY flows ./flows
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .

# Mount a lowbit project (params.yaml, dvc.yaml, .dvc/) at /work; stages run there.
WORKDIR /work
CMD ["lowbit", "run"]

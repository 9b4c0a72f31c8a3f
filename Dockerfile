# One image for the evolver workers, the MLflow server and optuna-dashboard.
FROM python:3.11-slim

RUN pip install --no-cache-dir uv
WORKDIR /app
ENV UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 PYTHONUNBUFFERED=1

# Dependencies first so that code changes do not rebuild the (large) environment layer.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project

COPY src src
COPY callbacks callbacks
COPY conf conf
RUN uv sync --frozen --no-dev

ENV PATH=/app/.venv/bin:$PATH
CMD ["evolver", "--help"]

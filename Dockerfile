# GPU cluster image: CUDA torch from PyPI (no constraints-cpu.txt). Not built on the CPU dev box.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 UV_NO_CACHE=1
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /app
COPY pyproject.toml ./
COPY and_dist ./and_dist
COPY configs ./configs
RUN uv pip install --system -e .
ENTRYPOINT ["python", "-m", "and_dist.train"]
CMD ["--config", "demo"]

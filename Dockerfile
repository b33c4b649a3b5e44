# syntax=docker/dockerfile:1
# tpx production image: `docker build -t tpx .` then `docker run --env-file .env tpx`.
# Exit codes for the restart policy (README.md): 0 clean stop, 2 bad configuration (do not
# restart), 3 Redis/PostgreSQL unreachable at start-up, 4 forced stop, 70 crash (panic dump).

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tpx ./tpx
COPY sql ./sql
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tpx
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENV PYTHONUNBUFFERED=1 \
    TPX_HTTP_ADDR=0.0.0.0:9108 \
    TPX_LOG_FORMAT=json \
    TPX_PANIC_DIR=/tmp/tpx-panic
EXPOSE 9108
# tpx drains on SIGTERM within TPX_DRAIN_TIMEOUT_S (8 s), inside Docker's default 10 s grace
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=2)"]
ENTRYPOINT ["tpx", "serve"]

# Strangler proxy image (also runs the demo backends and load generator in docker-compose.yml).
# Configure with STRANGLER_* environment variables (nested: STRANGLER_SHADOW__ENABLED=true) or a
# YAML file: docker run -v $PWD/strangler.yaml:/config/strangler.yaml IMAGE serve -c /config/strangler.yaml
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . \
    && useradd --system --uid 10001 --gid 0 --home-dir /data --create-home strangler \
    && chmod g+rwX /data

USER 10001
ENV STRANGLER_HOST=0.0.0.0 \
    STRANGLER_PORT=8080 \
    STRANGLER_EMBEDDED_REDIS_DIR=/data/redis \
    STRANGLER_LOG_LEVEL=info
WORKDIR /data
EXPOSE 8080

# /health is always open (no token needed, even with admin_reads_require_token) and answers on the
# admin port when STRANGLER_ADMIN_PORT is set. No curl in slim images: Python's urllib does it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('STRANGLER_ADMIN_PORT') or os.environ.get('STRANGLER_PORT', '8080'); prefix = os.environ.get('STRANGLER_ADMIN_PREFIX', '/_strangler'); urllib.request.urlopen(f'http://127.0.0.1:{port}{prefix}/health', timeout=2)"]

ENTRYPOINT ["strangler"]
CMD ["serve"]

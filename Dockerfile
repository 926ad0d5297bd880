# Strangler proxy image (also runs the demo backends and load generator in docker-compose.yml).
# Configure with STRANGLER_* environment variables (nested: STRANGLER_SHADOW__ENABLED=true) or a
# YAML file: docker run -v $PWD/strangler.yaml:/config/strangler.yaml IMAGE serve -c /config/strangler.yaml
# Built and run by tests/deploy/test_container.py (podman build --format docker keeps the HEALTHCHECK).
# Stage 1: the wheel, with the request path compiled by mypyc (setup.py). The C compiler lives only
# here; without one (apt unreachable) the same code is built uncompiled and the image still works.
FROM docker.io/library/python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN (apt-get update -qq \
     && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
     && { python3 -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
          || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-dev >/dev/null; }) \
    || echo "strangler image: no C compiler, the request path runs uncompiled"
COPY constraints.txt /src/
RUN python3 -m pip install -q -c /src/constraints.txt setuptools wheel mypy
COPY pyproject.toml setup.py README.md /src/
COPY proxy /src/proxy
RUN python3 -m pip wheel -q --no-deps --no-build-isolation -w /wheels /src

# Stage 2: the image.
FROM docker.io/library/python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Layer 1: the pinned dependencies only (pyproject's list and the tools extra: compose runs the demo
# backends and load from this image; versions from constraints.txt), so a
# change to the code does not reinstall them. The user has no home; /data is its writable directory.
COPY pyproject.toml constraints.txt /tmp/deps/
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/deps/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['tools']))" >/tmp/deps/requirements.txt \
    && pip install -c /tmp/deps/constraints.txt -r /tmp/deps/requirements.txt \
    && rm -rf /tmp/deps \
    && useradd --system --uid 10001 --gid 0 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin strangler \
    && mkdir /data && chown 10001:0 /data && chmod 0770 /data

# Layer 2: the project itself, the wheel from stage 1 (no build tree or compiler in the image).
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels

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

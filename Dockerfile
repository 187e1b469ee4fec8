# The sentence classifier service image.
#   docker build -t sentence-classifier .                         CPU image (the `serve` extra)
#   docker build --build-arg EXTRA=gpu -t sentence-classifier:gpu .   GPU image (onnxruntime-gpu replaces onnxruntime)
#   docker build --build-arg EXTRA=locust --target loadtest .     headless Locust (compose profile `loadtest`)
# Stages: base (Debian's Python 3.11) -> requirements (one pyproject extra's list) -> build (a virtualenv holding
# it, plus /app assembled) -> runtime (that virtualenv, contract.py, service/ and models/; non-root; no compilers, pip, caches
# or build-time CA files).
# Plain Dockerfile syntax only: it builds with the classic builder as well as with BuildKit.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS base
ENV LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# Debian's versions are not pinned (DL3008): bookworm's security updates replace them on the mirror.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# The extra's requirements, read from pyproject.toml, and the tested versions (constraints.txt). Copied onward by
# content, so a change elsewhere in pyproject.toml (another extra, a tool setting) does not redo the install below.
FROM base AS requirements
ARG EXTRA=serve
COPY pyproject.toml constraints.txt /build/
RUN python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"][sys.argv[2]]))' \
        /build/pyproject.toml "$EXTRA" > /build/requirements.txt

FROM base AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# Builds behind a TLS-intercepting proxy: put its CA as certs/NAME.crt (none by default). Build stage only.
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The GPU extra must bring onnxruntime-gpu alone: both packages in one environment shadow each other.
# pip and setuptools go once the install is done: the runtime never installs anything. The bytecode pip
# compiled stays (+27 MB): with a read-only root nothing could cache it, and start-up to ready took 0.7 s
# with it against 1.3 s without (measured with docker run, same machine).
COPY --from=requirements /build/requirements.txt /build/constraints.txt /build/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir -c /build/constraints.txt -r /build/requirements.txt \
    && /opt/venv/bin/python -c 'import importlib.metadata as md, sys; sys.exit("onnxruntime and onnxruntime-gpu are both installed") if {"onnxruntime", "onnxruntime-gpu"} <= {d.metadata["Name"].lower() for d in md.distributions()} else None' \
    && /opt/venv/bin/python -m pip uninstall -y -q pip setuptools \
    && find /opt/venv -depth -type d -name tests -path '*/site-packages/*' -exec rm -rf {} +
# Code and models, world-readable whatever the checkout's permissions (the service runs as another user).
COPY contract.py /app/contract.py
COPY service/ /app/service/
COPY models/ /app/models/
RUN find /app -type d -name __pycache__ -exec rm -rf {} + \
    && chmod -R a+rX,go-w /app

# A test client, not shipped: it starts from the build stage so that builds of the other targets with the
# classic builder (which builds every stage before the target) spend nothing here.
FROM build AS loadtest
WORKDIR /app
COPY loadtest/locustfile.py /app/loadtest/locustfile.py
COPY data/banking77/test.csv /app/data/banking77/test.csv
# Runs as root on purpose: a load generator with no listening port, and it must be able to write the
# bind-mounted report folder whoever owns it on the host.
ENV PYTHONPATH=/app \
    LOCUST_LOCUSTFILE=/app/loadtest/locustfile.py \
    LOCUST_HEADLESS=true
ENTRYPOINT ["locust"]

FROM base AS runtime
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
USER 10001:10001
# HOME on /tmp (a tmpfs or emptyDir under a read-only root): the user has no home, and onnxruntime keeps a
# small cache file there (without one it logs a warning at every start).
ENV HOME=/tmp \
    PYTHONPATH=/app \
    SCS_HOST=0.0.0.0 \
    SCS_PORT=8000 \
    SCS_GRPC_PORT=8001 \
    SCS_MODEL_DIR=/app/models/banking77
EXPOSE 8000 8001
# SIGTERM drains: /readyz turns 503, queued and running work completes, then the process exits.
# Give it time to (docker stop -t / compose stop_grace_period / Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('SCS_PORT', '8000'), timeout=2)"]
CMD ["python", "-m", "service"]

# The modelgate gateway image: `modelgate worker` by default (see docker-compose.yml).
# Dependencies come from requirements.lock with every hash checked, as on the
# no-Docker path; the project itself is installed without dependencies on top.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/app/numba-cache

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock

COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY detectors ./detectors
COPY evaluation ./evaluation
COPY modelgate ./modelgate
# The warm step compiles the detectors' numba kernels into the image, so no
# worker compiles them in its first batches. They go to NUMBA_CACHE_DIR, which
# the service user owns: numba uses no cache it cannot write, and neither
# site-packages nor /app is writable by that user.
RUN pip install --no-deps . \
    && cd / && python -m detectors.warm \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin modelgate \
    && mkdir -p /app/var \
    && chown modelgate /app/var \
    && chown -R modelgate /app/numba-cache

# Relative paths in gateway.config (var/server.key, var/models) resolve under /app,
# and /app/var is the volume docker-compose.yml mounts.
USER modelgate
VOLUME ["/app/var"]
EXPOSE 9464

# SIGTERM finishes the batch in flight, commits and exits 0 (see the worker).
STOPSIGNAL SIGTERM
ENTRYPOINT []
CMD ["modelgate", "worker"]

# One meshfl peer per container: `meshfl node --config /peers/peer-<i>.yaml` (see compose.yaml and README, "Containers").
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 \
    MESHFL_DATA=/data \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache

# torch first, from the CPU-only index (the default wheel brings CUDA libraries a peer does not use)
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/meshfl
COPY pyproject.toml README.md ./
COPY meshfl ./meshfl
RUN pip install --no-cache-dir .

# A non-root user (meshfl, uid 1000). Peer configs and certificates are mounted read-only under /peers; a peer writes
# only its out_dir (/peers/out/peer-<i>, a volume), open to any uid so that compose may run the
# container as the host user who owns the mounted private keys.
RUN useradd --create-home --uid 1000 --user-group meshfl \
    && mkdir -p /peers/out /data \
    && chown meshfl:meshfl /peers /data \
    && chmod 1777 /peers/out
USER 1000:1000
WORKDIR /peers

EXPOSE 50100
ENTRYPOINT ["meshfl", "node"]
CMD ["--config", "/peers/peer-0.yaml"]

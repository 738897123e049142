# stcs in a container (useDocker: true; scripts/setup.sh builds and runs it).
#   docker build -t stcs . && docker run -p 127.0.0.1:8000:8000 -v stcs-data:/data stcs
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ANONYMIZED_TELEMETRY=False \
    DB_PATH=/data \
    USE_DOCKER=true \
    APP_PORT=8000

WORKDIR /opt/stcs
COPY pyproject.toml README.md ./
COPY stcs ./stcs
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin stcs \
    && install -d -o stcs -g stcs -m 0700 /data

USER stcs
VOLUME ["/data"]
EXPOSE 8000
# useDocker listens on all interfaces inside the container; publish the port on loopback or
# behind your web server.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('APP_PORT', '8000'), timeout=4)"

ENTRYPOINT ["stcs", "serve"]

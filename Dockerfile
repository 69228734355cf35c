# jwt-proxy as a container sidecar: docker build -t jwt-proxy . && docker run -e AWS_REGION=... jwt-proxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin jwt-proxy

WORKDIR /app
COPY setup.cfg setup.py README.md LICENSE ./
COPY jwt_proxy ./jwt_proxy
COPY conf ./conf
RUN pip install --no-compile . && rm -rf /root/.cache

# In a container the proxy must be reachable from the other containers of the task/pod.
# PROMETHEUS_MULTIPROC_DIR holds the workers' metric values; jwt-proxy empties it at start
# (and creates it if a tmpfs was mounted over /tmp, e.g. with --read-only --tmpfs /tmp).
ENV LISTEN_ADDR=0.0.0.0:8080 \
    METRICS_LISTEN_ADDR=0.0.0.0:9090 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/jwt-proxy-metrics
RUN install -d -m 0700 -o jwt-proxy /tmp/jwt-proxy-metrics

USER jwt-proxy
EXPOSE 8080 9090
ENTRYPOINT ["jwt-proxy"]

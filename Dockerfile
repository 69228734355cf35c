# jwt-proxy in a container, usually a sidecar next to the application that calls the API.
#
#   docker build -t jwt-proxy .
#   docker run --rm -p 127.0.0.1:8080:8080 \
#     -e AWS_REGION=eu-west-1 -e UPSTREAM_HOST=api.example.com jwt-proxy
#
# Whoever reaches port 8080 can mint tokens as this container's AWS identity: pin the
# upstream (UPSTREAM_HOST) or, when clients name it in X-Upstream-Host, restrict it with
# ALLOWED_UPSTREAM_HOSTS, and publish the port only to the containers that need it.
# conf/container-test.sh builds this image and smoke-tests it.

# -- build: a virtual environment with exactly the versions in constraints.txt --------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python3 -m venv /opt/jwt-proxy
COPY constraints.txt setup.cfg setup.py README.md LICENSE ./
COPY jwt_proxy ./jwt_proxy
RUN /opt/jwt-proxy/bin/pip install --no-cache-dir --no-compile -c constraints.txt . \
    && /opt/jwt-proxy/bin/pip uninstall --yes pip setuptools wheel

# -- run: the same base, the virtual environment, no compilers or caches --------------
FROM python:3.11-slim

# The proxy must be reachable from the other containers of the pod or task.
# PROMETHEUS_MULTIPROC_DIR holds the workers' metric values; jwt-proxy empties it at start
# (and creates it when a tmpfs is mounted over /tmp, as with --read-only --tmpfs /tmp).
ENV PATH=/opt/jwt-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LISTEN_ADDR=0.0.0.0:8080 \
    METRICS_LISTEN_ADDR=0.0.0.0:9090 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/jwt-proxy-metrics

RUN groupadd --system --gid 10001 jwt-proxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin jwt-proxy \
    && install -d -m 0700 -o jwt-proxy -g jwt-proxy /tmp/jwt-proxy-metrics

COPY --from=build /opt/jwt-proxy /opt/jwt-proxy
WORKDIR /app
COPY conf/gunicorn.conf.py ./conf/

# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["jwt-proxy", "healthcheck"]
ENTRYPOINT ["jwt-proxy"]

"""The baseline: the obvious Flask + requests reverse proxy.

What a first version of jwt-proxy would look like: a catch-all Flask view that adds a
fixed ``Authorization`` header and forwards with ``requests.Session().request(...)``,
``stream=True``, and streams the answer back with ``iter_content``. No token store, no
metrics, no access log, no header hardening: just the forwarding. Run under the same
gunicorn as jwt-proxy, for example::

    NAIVE_UPSTREAM=http://127.0.0.1:8081 gunicorn -k gthread -w 2 --threads 16 \
        --chdir bench naive_proxy:app

Benchmark use only; it is not a correct proxy (it rewrites what it forwards).
"""

from __future__ import annotations

import os

import requests
from flask import Flask
from flask import Response
from flask import request

UPSTREAM = os.environ.get("NAIVE_UPSTREAM", "http://127.0.0.1:8081").rstrip("/")
AUTHORIZATION = "Bearer " + os.environ.get("NAIVE_TOKEN", "naive-fixed-token")
CHUNK_BYTES = 65536
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}

app = Flask(__name__)
session = requests.Session()  # one per worker: gunicorn imports this module after the fork


@app.route("/", defaults={"path": ""}, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@app.route("/<path:path>", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def proxy(path: str) -> Response:
    # Content-Length is dropped: requests cannot size a WSGI input stream, and would send
    # it with "Transfer-Encoding: chunked" on top. The body then goes upstream chunked.
    headers = {
        k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() not in ("host", "content-length")
    }
    headers["Authorization"] = AUTHORIZATION
    has_body = request.content_length is not None or "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    upstream = session.request(
        request.method,
        UPSTREAM + request.full_path if request.query_string else UPSTREAM + request.path,
        headers=headers,
        data=request.stream if has_body else None,
        stream=True,
        allow_redirects=False,
        timeout=30,
    )
    response_headers = [(k, v) for k, v in upstream.raw.headers.items() if k.lower() not in HOP_BY_HOP]
    response = Response(
        upstream.iter_content(chunk_size=CHUNK_BYTES),
        status=upstream.status_code,
        headers=response_headers,
        direct_passthrough=True,
    )
    response.call_on_close(upstream.close)
    return response

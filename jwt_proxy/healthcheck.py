"""``jwt-proxy healthcheck``: one readiness probe from inside the container.

Docker's ``HEALTHCHECK`` and ECS container health checks can only run a command in the
container, and the slim image has no curl. This asks the metrics listener that the same
settings describe for ``/readyz`` over loopback, without any HTTP proxy from the
environment, and turns the answer into an exit status and one line.
"""

from __future__ import annotations

import dataclasses
import http.client

from .config import ListenAddress

# The metrics listener's readiness path; not imported from .metrics, which would load
# prometheus_client in a process that only makes one request.
READY_PATH = "/readyz"
PROBE_TIMEOUT_S = 4.0
MAX_REASON_CHARS = 200


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    ready: bool
    line: str


def probe_readiness(address: ListenAddress, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """GET ``/readyz`` from the listener bound at ``address`` (a wildcard means this host)."""
    host = address.connect_host
    url = f"http://{ListenAddress(host, address.port).bind}{READY_PATH}"
    connection = http.client.HTTPConnection(host, address.port, timeout=timeout_s)
    try:
        connection.request("GET", READY_PATH, headers={"Connection": "close"})
        response = connection.getresponse()
        body = response.read(4096).decode("utf-8", "replace")
    except ConnectionRefusedError:
        return ProbeResult(False, f"not ready: nothing listens at {url} (connection refused)")
    except TimeoutError:
        return ProbeResult(False, f"not ready: {url} did not answer within {timeout_s:g}s")
    except (OSError, http.client.HTTPException) as exc:
        return ProbeResult(False, f"not ready: {url}: {type(exc).__name__}: {exc}")
    finally:
        connection.close()
    reason = " ".join(body.split())[:MAX_REASON_CHARS]
    if response.status == 200:
        return ProbeResult(True, f"ready: {url} answered 200")
    return ProbeResult(False, f"not ready: {url} answered {response.status}" + (f": {reason}" if reason else ""))

"""A small HTTP server served by a daemon thread, for the proxy's side listeners.

The metrics listener (in the gunicorn master) and the token endpoint (in the token
agent) are not gunicorn's: each is a stdlib-style server whose ``serve_forever`` loop
runs in a thread of its own, started and stopped with the process that owns it.
"""

from __future__ import annotations

import threading
import typing as t

#: How often a serving loop checks whether it was asked to stop.
POLL_INTERVAL_S = 0.25


class ServingThread:
    """Runs ``server.serve_forever`` in a daemon thread named ``name``; :meth:`stop`
    ends the loop (if it ran) and closes the server's socket."""

    def __init__(self, server: t.Any, name: str) -> None:
        self._server = server
        self._name = name
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL_S},
            name=self._name,
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()  # waits for the loop, which never ran if not started
            self._thread = None
        self._server.server_close()

"""``jwt-proxy`` with experimental monkeypatches, to measure a proposed change before
anyone makes it (``run.py --profile --profile-variants`` starts it).

Same command line as ``jwt-proxy``; the patches named in ``JWT_PROXY_WHATIF``
(comma-separated) are applied in the master before gunicorn forks, so every worker
has them. Benchmark use only: nothing here is part of the product, and each patch
stands for a change to make properly in ``jwt_proxy/``:

- ``proxies``: resolve ``HTTP(S)_PROXY``/``NO_PROXY`` once per upstream (scheme, host)
  and worker instead of on every request (``forward.send`` calls
  ``requests.utils.get_environ_proxies``, which walks ``os.environ`` each time);
- ``gunicorn-access``: a gunicorn logger whose ``access()`` does nothing (with
  ``logconfig_dict`` set, gunicorn builds the access-log atoms of every request and
  only then drops the record at the ``CRITICAL`` level of ``gunicorn.access``);
- ``blocksize``: upstream connections send request bodies in 1 MiB pieces instead of
  urllib3's 16 KiB (each 16 KiB read of ``wsgi.input`` makes gunicorn's unreader copy
  what it has buffered ahead, up to 1 MiB, into a new buffer).
"""

from __future__ import annotations

import os
import sys

PATCHES = {name.strip() for name in os.environ.get("JWT_PROXY_WHATIF", "").split(",") if name.strip()}
KNOWN = {"proxies", "gunicorn-access", "blocksize"}
BODY_BLOCK_BYTES = 1024 * 1024


def apply(patches: set[str]) -> None:
    unknown = patches - KNOWN
    if unknown:
        raise SystemExit(f"whatif: unknown patch(es) {sorted(unknown)}; known: {sorted(KNOWN)}")
    if "proxies" in patches:
        from urllib.parse import urlsplit

        from jwt_proxy import forward

        original = forward.get_environ_proxies
        cache: dict[tuple[str, str], dict[str, str]] = {}

        def cached_environ_proxies(url: str, no_proxy: str | None = None) -> dict[str, str]:
            parts = urlsplit(url)
            key = (parts.scheme, parts.netloc)
            found = cache.get(key)
            if found is None:
                found = cache[key] = original(url, no_proxy)
            return found

        forward.get_environ_proxies = cached_environ_proxies
    if "gunicorn-access" in patches:
        from gunicorn import glogging

        glogging.Logger.access = lambda self, *args, **kwargs: None
    if "blocksize" in patches:
        from urllib3 import connection

        original_init = connection.HTTPConnection.__init__

        def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            kwargs["blocksize"] = BODY_BLOCK_BYTES
            original_init(self, *args, **kwargs)

        connection.HTTPConnection.__init__ = init  # HTTPSConnection inherits it


def main() -> int:
    apply(PATCHES)
    from jwt_proxy.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

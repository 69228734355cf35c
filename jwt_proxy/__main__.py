"""``python -m jwt_proxy`` and the ``jwt-proxy`` / ``aws-outbound-jwt-proxy`` scripts.

The CLI is imported inside :func:`main` so that nothing heavy (boto3, Flask, gunicorn) is
imported before the command line has been read.
"""

from __future__ import annotations

import sys


def main() -> None:
    from .cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()

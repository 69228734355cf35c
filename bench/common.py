"""What every module of the benchmark shares: paths, sizes, the targets and the progress log.

The modules of ``bench/`` import each other as top-level modules: ``run.py`` puts this
folder (and the repository root, for ``tests.processes``) on ``sys.path`` first.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BIN_DIR = Path(sys.executable).parent
MIB = 1024 * 1024
FOREIGN_CPU_WARN_CORES = 0.1
SLOW_DELAY_S = 0.2
AUDIENCE = "https://bench.example.com"
CONCURRENCY = (1, 16, 64)
TARGET_ORDER = ("direct", "nginx", "jwt-proxy", "naive", "go")
TARGET_LABELS = {
    "direct": "direct (upstream)",
    "nginx": "nginx proxy_pass",
    "jwt-proxy": "jwt-proxy",
    "naive": "naive Flask+requests",
    "go": "Go ReverseProxy",
}
INSTALL_HINT = "install with: apt-get install -y nginx wrk   (Debian/Ubuntu; brew install nginx wrk on macOS)"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

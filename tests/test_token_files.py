"""Token files against the real CLI and local-sts: content, mode, atomic rewrites, STS calls."""

from __future__ import annotations

import os
import subprocess
import time

import jwt
import pytest

from tests.conftest import JWT_PROXY
from tests.conftest import aws_env
from tests.conftest import free_port
from tests.sdk_helpers import AZURE_AUDIENCE
from tests.sdk_helpers import GOOGLE_AUDIENCE
from tests.sdk_helpers import file_mode
from tests.sdk_helpers import listening
from tests.sdk_helpers import verified_claims
from tests.sdk_helpers import wait_for_file
from tests.sdk_helpers import wait_for_status

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 20
# Short tokens: local-sts cuts every token to this; the refresh skew is half of it.
SHORT_LIFETIME_S = 20
SHORT_SKEW_S = 10
REWRITES_WANTED = 2
REWRITE_WATCH_S = 60.0
# exp is whole seconds and the reader's clock is read after the file: allow this much.
CLOCK_MARGIN_S = 1.0


def test_the_file_holds_a_jwt_for_its_audience_with_the_mode_asked_for(start_proxy, sts, tmp_path):
    path = tmp_path / "azure-token"
    proxy = start_proxy("--token-file", f"{path}={AZURE_AUDIENCE}", "--token-file-mode", "0640")
    token = wait_for_file(str(path), process=proxy)
    assert token == token.strip() and not token.endswith("\n")
    assert len(token.split(".")) == 3
    claims = verified_claims(token, sts.url, AZURE_AUDIENCE)
    assert claims["aud"] == AZURE_AUDIENCE
    assert 3500 < claims["exp"] - time.time() <= 3600 + CLOCK_MARGIN_S
    assert file_mode(str(path)) == 0o640
    assert [name for name in os.listdir(tmp_path)] == ["azure-token"]  # no temporary file left
    assert proxy.stop() == 0
    assert path.read_text() == token  # not removed at exit


def test_default_mode_is_owner_only_and_the_environment_variable_takes_a_list(start_proxy, sts, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    proxy = start_proxy(env={"TOKEN_FILE": f"{first}={AZURE_AUDIENCE},{second}={GOOGLE_AUDIENCE}"})
    for path, audience in ((first, AZURE_AUDIENCE), (second, GOOGLE_AUDIENCE)):
        token = wait_for_file(str(path), process=proxy)
        assert verified_claims(token, sts.url, audience)["aud"] == audience
        assert file_mode(str(path)) == 0o600


def test_one_sts_call_per_audience_for_the_whole_process_tree(start_proxy, sts, tmp_path):
    paths = [tmp_path / "one", tmp_path / "two", tmp_path / "google"]
    proxy = start_proxy(
        "--workers",
        "2",
        "--token-file",
        f"{paths[0]}={AZURE_AUDIENCE}",
        "--token-file",
        f"{paths[1]}={AZURE_AUDIENCE}",
        "--token-file",
        f"{paths[2]}={GOOGLE_AUDIENCE}",
    )
    for path in paths:
        wait_for_file(str(path), process=proxy)
    wait_for_status(f"http://127.0.0.1:{proxy.metrics_port}/readyz", 200)
    assert paths[0].read_text() == paths[1].read_text()
    assert sts.stats()["by_audience"] == {AZURE_AUDIENCE: 1, GOOGLE_AUDIENCE: 1}


def test_short_tokens_are_rewritten_atomically_before_half_the_skew_is_left(start_proxy, sts, tmp_path):
    sts.configure(max_token_lifetime_s=SHORT_LIFETIME_S)
    path = tmp_path / "token"
    proxy = start_proxy(
        "--workers",
        "2",
        "--token-duration",
        "60s",
        "--token-refresh-skew",
        f"{SHORT_SKEW_S}s",
        "--token-file",
        f"{path}={AZURE_AUDIENCE}",
    )
    wait_for_file(str(path), process=proxy)
    seen: list[str] = []
    least_left_s = float("inf")
    reads = 0
    deadline = time.monotonic() + REWRITE_WATCH_S
    while len(seen) < REWRITES_WANTED + 1 and time.monotonic() < deadline:
        with open(path) as handle:
            token = handle.read()
        reads += 1
        parts = token.split(".")
        assert len(parts) == 3 and all(parts), f"read {len(token)} characters that are not a whole JWT"
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        left_s = exp - time.time()
        least_left_s = min(least_left_s, left_s)
        if not seen or seen[-1] != token:
            seen.append(token)
        # Re-read without pause around the moment the file is due to be replaced, so a
        # partial or empty file would be caught; in between, do not burn the CPU.
        if abs(left_s - SHORT_SKEW_S) > 2:
            time.sleep(0.02)
    assert len(seen) == REWRITES_WANTED + 1, f"{len(seen)} tokens in {REWRITE_WATCH_S}s"
    assert least_left_s > SHORT_SKEW_S / 2 - CLOCK_MARGIN_S
    assert reads > 1000
    # One STS call per rewrite, whatever the number of workers (one more may be in flight).
    calls = sts.stats()["by_audience"][AZURE_AUDIENCE]
    assert len(seen) <= calls <= len(seen) + 1
    assert sorted(os.listdir(tmp_path)) == ["token"]


def run(args, env=None, **kwargs):
    return subprocess.run(
        args, env=env or aws_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL, **kwargs
    )


@pytest.mark.parametrize("command", [[], ["agent"]])
def test_a_missing_directory_stops_the_start_with_one_line_before_anything_binds(tmp_path, command):
    port, metrics_port = free_port(), free_port()
    missing = tmp_path / "nowhere" / "token"
    result = run(
        [
            JWT_PROXY,
            "--listen-addr",
            f"127.0.0.1:{port}",
            "--metrics-listen-addr",
            f"127.0.0.1:{metrics_port}",
            "--token-file",
            f"{missing}={AZURE_AUDIENCE}",
            *command,
        ]
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--token-file" in lines[0] and f"directory {missing.parent} does not exist" in lines[0]
    assert not listening(port) and not listening(metrics_port)


def test_an_unwritable_directory_stops_the_start_with_one_line(tmp_path):
    if os.geteuid() == 0:
        directory = "/sys"  # root may write anywhere else; sysfs refuses to create files
    else:
        directory = tmp_path / "read-only"
        directory.mkdir()
        directory.chmod(0o555)
    port = free_port()
    result = run([JWT_PROXY, "--listen-addr", f"127.0.0.1:{port}", "--token-file", f"{directory}/token=aud"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--token-file" in lines[0] and f"directory {directory} is not writable" in lines[0]
    assert not listening(port)


def test_plain_gunicorn_keeps_the_token_files_too(start_proxy, sts, tmp_path):
    from tests.conftest import BIN_DIR
    from tests.conftest import REPO

    path = tmp_path / "token"
    proxy = start_proxy(
        command=[str(BIN_DIR / "gunicorn"), "-c", str(REPO / "conf" / "gunicorn.conf.py")],
        env={"TOKEN_FILE": f"{path}={AZURE_AUDIENCE}", "TOKEN_FILE_MODE": "0644"},
    )
    token = wait_for_file(str(path), process=proxy)
    assert verified_claims(token, sts.url, AZURE_AUDIENCE)["aud"] == AZURE_AUDIENCE
    assert file_mode(str(path)) == 0o644
    assert proxy.stop() == 0
    assert path.read_text() == token

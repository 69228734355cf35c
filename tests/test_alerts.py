"""The alerting rules in conf/prometheus-alerts.yml, checked and unit-tested by promtool.

promtool comes from Debian's ``prometheus`` package (``.ci/run`` installs it). Without it
the test skips on a developer machine, but fails under CI (``CI`` set): there it must run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "conf" / "prometheus-alerts.yml"
RULE_TESTS = REPO / "tests" / "prometheus" / "alerts_test.yml"
PROMTOOL_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not on PATH: install Debian's prometheus package (.ci/run does)")
        pytest.skip("promtool is not on PATH (apt-get install prometheus)")
    return path


def run(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S, stdin=subprocess.DEVNULL, cwd=REPO
    )


def test_the_rules_are_valid(promtool):
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_on_its_series_and_stays_quiet_on_the_others(promtool):
    result = run(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule}
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alerts and fires == alerts and quiet == alerts

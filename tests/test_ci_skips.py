"""CI is never green on a test it silently left out: under SMOLLM2_CI=1 (.ci/run) a skip fails,
unless its reason is on tests/conftest.py's short allowlist; every skip is listed with its reason."""

import os
import subprocess
import sys

from tests.conftest import CI_ALLOWED_SKIPS
from tests.helpers import ROOT

SKIPPING = f"""
import pytest

def test_needs_weights():
    pytest.skip("the published SmolLM2-135M-Instruct is not cached in /nowhere: python scripts/fetch_instruct.py")

@pytest.mark.skipif(True, reason="no browser: /usr/bin/chromium is missing (apt-get install chromium)")
def test_needs_a_browser():
    pass

def test_needs_a_package():
    pytest.importorskip("no_such_package_for_smollm2")

def test_needs_hardware_ci_lacks():
    pytest.skip("{CI_ALLOWED_SKIPS[0]}: this machine has none")

def test_runs():
    pass
"""


SKIPPED_WHOLE = """
import pytest

pytest.importorskip("no_such_engine_for_smollm2")


def test_uses_it():
    pass
"""


def run_pytest(folder, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SMOLLM2_CI"} | {"PYTHONPATH": str(ROOT)}
    if ci:
        env["SMOLLM2_CI"] = "1"
    # our pytest settings (-rfEs) and our conftest's hooks, on a test file of skips outside tests/
    argv = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "-p", "tests.conftest", "-q"]
    return subprocess.run(
        [*argv, "test_skips.py", "test_whole.py"], cwd=folder, env=env, capture_output=True, text=True
    )


def test_under_ci_a_skip_fails_saying_what_is_missing_and_how_to_get_it(tmp_path):
    (tmp_path / "test_skips.py").write_text(SKIPPING)
    (tmp_path / "test_whole.py").write_text(SKIPPED_WHOLE)
    result = run_pytest(tmp_path, ci=True)
    assert result.returncode == 1, result.stdout
    out = result.stdout
    assert "2 failed, 1 passed, 2 skipped, 1 error" in out  # the skipif mark fails at set-up: an error
    for reason in (
        "the published SmolLM2-135M-Instruct is not cached in /nowhere: python scripts/fetch_instruct.py",
        "no browser: /usr/bin/chromium is missing (apt-get install chromium)",
        "could not import 'no_such_package_for_smollm2': No module named 'no_such_package_for_smollm2'",
    ):
        assert f"SMOLLM2_CI=1: skipped ({reason}); CI must run it" in out, out
    assert f"SKIPPED [1] test_skips.py:15: {CI_ALLOWED_SKIPS[0]}: this machine has none" in out
    whole = "could not import 'no_such_engine_for_smollm2': No module named 'no_such_engine_for_smollm2'"
    assert (
        f"FAILED {tmp_path / 'test_whole.py'}:4: SMOLLM2_CI=1: skipped ({whole}); CI must run it" in out
    )  # a file skipped whole


def test_outside_ci_skips_pass_and_each_is_listed_with_its_reason(tmp_path):
    (tmp_path / "test_skips.py").write_text(SKIPPING)
    (tmp_path / "test_whole.py").write_text(SKIPPED_WHOLE)
    result = run_pytest(tmp_path, ci=False)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 5 skipped" in result.stdout
    assert "SKIPPED [1] test_skips.py:7: no browser: /usr/bin/chromium is missing (apt-get install chromium)" in (
        result.stdout
    )
    assert "SMOLLM2_CI=1" not in result.stdout

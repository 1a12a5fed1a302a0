"""A pytest plugin (loaded by tests/conftest.py): the summary lists skipped tests grouped by reason with
counts, and with FEDCMD_ALLOWED_SKIPS set (a regex; .ci/run sets it) a skip whose reason does not match
fails the run, so coverage cannot vanish behind skips while CI stays green."""

from __future__ import annotations

import os
import re
from collections import Counter

import pytest

ALLOWED_SKIPS = "FEDCMD_ALLOWED_SKIPS"


def skip_reason(report: pytest.TestReport) -> str:
    """The reason a skipped test gave (without pytest's "Skipped: " prefix)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def skips_by_reason(reports: list[pytest.TestReport]) -> Counter[str]:
    return Counter(skip_reason(r) for r in reports if r.skipped and not hasattr(r, "wasxfail"))


def _disallowed(reasons: Counter[str]) -> list[str]:
    pattern = os.environ.get(ALLOWED_SKIPS)
    if pattern is None:
        return []
    return [reason for reason in reasons if not re.search(pattern, reason)]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    reasons = skips_by_reason(terminalreporter.stats.get("skipped", []))
    terminalreporter.section("skipped tests by reason")
    if not reasons:
        terminalreporter.line("none skipped")
    for reason, n in reasons.most_common():
        terminalreporter.line(f"{n:5d} skipped: {reason}")
    bad = _disallowed(reasons)
    if bad:
        terminalreporter.line(
            f"FAILED: {sum(reasons[r] for r in bad)} skips not allowed by {ALLOWED_SKIPS}="
            f"{os.environ[ALLOWED_SKIPS]!r}",
            red=True,
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or exitstatus != 0:
        return
    if _disallowed(skips_by_reason(reporter.stats.get("skipped", []))):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

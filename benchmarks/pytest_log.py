"""A pytest plugin that appends one JSON line per event to the file named by $DPO_FAST_TEST_LOG.

`benchmarks/gpu_check.py` runs the kernel tests with it (``-p benchmarks.pytest_log``) and reads the lines
as they come, so a run cut short still reports every test that finished. Events: "collected" (the
selected node ids), "collect_error", and one "outcome" per test (pass / fail / error / skipped).
"""
import json
import os
from typing import Any, Dict

LOG_ENV = "DPO_FAST_TEST_LOG"


def _write(record: Dict[str, Any]) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _detail(report: Any) -> str:
    """A skip's reason, or a failure's crash message (the assertion and its values)."""
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple):
        return str(longrepr[2])
    crash = getattr(longrepr, "reprcrash", None)
    return (crash.message if crash is not None else str(longrepr or ""))[:600]


def pytest_collectreport(report: Any) -> None:
    if report.failed:
        _write({"event": "collect_error", "nodeid": report.nodeid, "detail": _detail(report)})


def pytest_collection_finish(session: Any) -> None:
    _write({"event": "collected", "nodeids": [item.nodeid for item in session.items]})


def pytest_runtest_logreport(report: Any) -> None:
    """A test's call outcome, or its setup's when that failed or skipped, or a teardown failure."""
    if report.when == "call" or (report.when == "setup" and not report.passed) or \
            (report.when == "teardown" and report.failed):
        if report.passed:
            status = "pass"
        elif report.skipped:
            status = "skipped"
        else:
            status = "fail" if report.when == "call" else "error"
        _write({"event": "outcome", "nodeid": report.nodeid, "status": status, "detail": _detail(report),
                "seconds": round(report.duration, 3)})

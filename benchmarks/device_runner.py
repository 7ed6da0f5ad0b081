"""The accelerator check's test run: pytest, selected by marker, on the device's backend.

``device_check.py`` calls ``run_tests`` before it times anything. The tests are chosen by a
pytest marker expression over the ``tests/`` root (not by file names), so the selection holds
wherever the test modules live; the outcomes are read from pytest's JUnit XML report
(``--junitxml``), which serial and pytest-xdist runs write alike.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Any

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The library tests that check values and gradients against references, without those that
# need a multi-device mesh or run for minutes: what must hold on the device's own backend.
NUMERICS_MARKERS = "library and numerics and not sharding and not slow"
# One quick numerics test, for --smoke (chosen by name within the same marker expression).
SMOKE_KEYWORD = "test_half_precision_accumulates_in_float32"
TESTS_ROOT = "tests"
# From best to worst, as a JUnit <testcase> reports them (no child element: passed).
OUTCOMES = ("passed", "skipped", "error", "failed")
_CHILD_OUTCOME = {"skipped": "skipped", "error": "error", "failure": "failed"}
# pytest's exit status when the selection is empty: a marker expression that matches nothing.
NO_TESTS_COLLECTED = 5
# After a timeout, how long pytest gets to finish its session (and write the JUnit report of
# what ran) after SIGINT, before the whole process group is killed.
INTERRUPT_GRACE_S = 20.0


def junit_outcomes(path: str) -> dict[str, str]:
    """{test id: passed / failed / error / skipped} from a pytest JUnit XML report.

    A test id is ``classname::name`` as pytest writes them (``tests.test_softmax::test_x[1]``,
    a class's tests ``tests.test_a.TestB::test_y``). A test that failed and then errored in
    teardown counts as failed; an xfail is reported by pytest as skipped. A test stopped by an
    interrupt has no outcome and is left out.
    """
    outcomes: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:
            continue  # the test that an interrupt (the timeout) stopped: a bare element
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        found = [_CHILD_OUTCOME[child.tag] for child in case if child.tag in _CHILD_OUTCOME]
        # The worst of what the element holds, and of an earlier element with the same id.
        outcomes[test_id] = max([*found, outcomes.get(test_id, "passed")], key=OUTCOMES.index)
    return outcomes


def pytest_command(
    marker: str, workers: int, junit_path: str, root: str, keyword: str | None = None
) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-m", marker]
    if keyword:
        command += ["-k", keyword]
    command += ["-n", str(workers)] if workers > 1 else ["-p", "no:xdist"]
    return [*command, f"--junitxml={junit_path}", root]


def _wait(child: subprocess.Popen[bytes], timeout_s: float) -> tuple[int | None, bool]:
    """(exit status or None, timed out). On a timeout pytest is interrupted first, so that it
    writes the report of the tests it finished; then its process group (with the xdist
    workers, which hold the device) is killed."""
    try:
        return child.wait(timeout=max(timeout_s, 1.0)), False
    except subprocess.TimeoutExpired:
        pass
    os.killpg(child.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=INTERRUPT_GRACE_S)
    # Whatever of the group is left (pytest itself, or a worker that outlived it) goes; none
    # left is a ProcessLookupError.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    return None, True


def run_tests(
    marker: str,
    workers: int,
    timeout_s: float,
    out_dir: str,
    root: str = TESTS_ROOT,
    keyword: str | None = None,
) -> dict[str, Any]:
    """Runs the tests ``marker`` selects under ``root`` in a subprocess; never raises.

    Writes ``tests.log`` (pytest's output) and ``tests.xml`` (its JUnit report) to
    ``out_dir`` and returns the counts, the ids that did not pass and whether the run is ok:
    exit status 0 and at least one passed test (an expression that selects nothing is not).
    """
    log_path = os.path.join(out_dir, "tests.log")
    junit_path = os.path.join(out_dir, "tests.xml")
    if os.path.exists(junit_path):
        os.remove(junit_path)  # a stale report must not stand in for this run's
    command = pytest_command(marker, workers, junit_path, root, keyword)
    # The child must not grab most of the accelerator's memory at start-up (JAX's default),
    # nor its workers each other's.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    print(f"tests (timeout {timeout_s:.0f} s): {' '.join(command[1:])}", flush=True)
    start = time.monotonic()
    with open(log_path, "w") as log_file:
        # Its own session, so that a timeout reaches the xdist workers too.
        child = subprocess.Popen(
            command,
            cwd=_REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        returncode, timed_out = _wait(child, timeout_s)
    with open(log_path) as f:
        log = f.read()
    outcomes = junit_outcomes(junit_path) if os.path.exists(junit_path) else {}
    summary = _summary(outcomes, returncode, timed_out, log)
    summary.update(
        command=" ".join(command),
        marker=marker,
        keyword=keyword,
        seconds=round(time.monotonic() - start, 1),
        log=os.path.basename(log_path),
        junit=os.path.basename(junit_path) if os.path.exists(junit_path) else None,
    )
    _print_summary(summary, log)
    return summary


def _summary(
    outcomes: dict[str, str], returncode: int | None, timed_out: bool, log: str
) -> dict[str, Any]:
    counts = {k: sum(v == k for v in outcomes.values()) for k in OUTCOMES}
    summary: dict[str, Any] = {
        "returncode": returncode,
        "timed_out": timed_out,
        "passed": counts["passed"],
        "failed": counts["failed"],
        "errors": counts["error"],
        "skipped": counts["skipped"],
        "not_passed": sorted(k for k, v in outcomes.items() if v in ("failed", "error")),
        "log_tail": log[-3000:],
        "ok": returncode == 0 and counts["passed"] > 0,
    }
    if returncode == NO_TESTS_COLLECTED:
        summary["note"] = "the marker expression selected no test"
    return summary


def _print_summary(summary: dict[str, Any], log: str) -> None:
    verdict = "timed out" if summary["timed_out"] else ("passed" if summary["ok"] else "FAILED")
    print(
        f"tests {verdict} in {summary['seconds']} s: {summary['passed']} passed, "
        f"{summary['failed']} failed, {summary['errors']} errors, {summary['skipped']} skipped"
        + (f" ({summary['note']}: -m {summary['marker']!r})" if "note" in summary else ""),
        flush=True,
    )
    for test_id in summary["not_passed"]:
        print(f"  not passed: {test_id}", flush=True)
    if summary["returncode"] not in (0, None, NO_TESTS_COLLECTED) and summary["junit"] is None:
        print(log[-2000:], flush=True)  # pytest broke before writing its report


def tests_failed(tests: dict[str, Any]) -> bool:
    """A failing or erroring test, or a run that broke without timing out (not a timeout)."""
    broke = not tests["ok"] and not tests["timed_out"]
    return bool(tests["failed"] or tests["errors"] or broke)

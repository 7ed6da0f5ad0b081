"""The accelerator check's test run: selection by pytest marker, outcomes from JUnit XML.

Each test starts a real pytest on a generated tests root (``fake_tests``, see conftest.py),
selected with the check's own marker expression; no accelerator is needed.
"""

from __future__ import annotations

import pytest

from benchmarks import device_runner

MODULE = "test_fake_library"


def _run(fake_tests, tmp_path, **kwargs):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    marker = kwargs.pop("marker", device_runner.NUMERICS_MARKERS)
    summary = device_runner.run_tests(
        marker,
        timeout_s=kwargs.pop("timeout_s", 120),
        out_dir=str(out),
        root=str(fake_tests),
        **kwargs,
    )
    return summary, out


@pytest.mark.parametrize("workers", [1, 2], ids=["serial", "xdist"])
def test_marker_selects_and_junit_reports_each_outcome(fake_tests, tmp_path, workers):
    summary, out = _run(fake_tests, tmp_path, workers=workers)
    outcomes = device_runner.junit_outcomes(str(out / "tests.xml"))
    assert outcomes == {
        f"{MODULE}::test_half_precision_accumulates_in_float32": "passed",
        f"{MODULE}::test_passes_for_1_fails_for_2[1]": "passed",
        f"{MODULE}::test_passes_for_1_fails_for_2[2]": "failed",
        f"{MODULE}::test_skips": "skipped",
        f"{MODULE}.TestGroup::test_passes": "passed",
        f"{MODULE}.TestGroup::test_errors_in_setup": "error",
    }  # not the sharding, slow or unmarked tests
    assert (summary["passed"], summary["failed"], summary["errors"], summary["skipped"]) == (
        3,
        1,
        1,
        1,
    )
    assert summary["not_passed"] == [
        f"{MODULE}.TestGroup::test_errors_in_setup",
        f"{MODULE}::test_passes_for_1_fails_for_2[2]",
    ]
    assert summary["returncode"] == 1 and not summary["ok"] and not summary["timed_out"]
    assert device_runner.tests_failed(summary)
    assert (out / "tests.log").read_text() and summary["junit"] == "tests.xml"


def test_keyword_narrows_the_marker_selection(fake_tests, tmp_path):
    summary, _ = _run(fake_tests, tmp_path, workers=1, keyword=device_runner.SMOKE_KEYWORD)
    assert (summary["passed"], summary["failed"], summary["errors"]) == (1, 0, 0)
    assert summary["ok"] and not device_runner.tests_failed(summary)


def test_an_expression_that_selects_nothing_is_not_ok(fake_tests, tmp_path):
    summary, _ = _run(fake_tests, tmp_path, workers=1, marker="library and no_such_marker")
    assert summary["returncode"] == device_runner.NO_TESTS_COLLECTED
    assert summary["passed"] == 0 and not summary["ok"]
    assert summary["note"] == "the marker expression selected no test"
    assert device_runner.tests_failed(summary)  # a broken selection fails the check


def test_a_timeout_keeps_what_finished_and_is_not_a_failure(fake_tests, tmp_path):
    (fake_tests / "test_fake_sleeps.py").write_text(
        "import time\n\nimport pytest\n\n\n"
        "@pytest.mark.library\n@pytest.mark.numerics\n"
        "def test_sleeps():\n    time.sleep(300)\n"
    )
    # 60 s: the run's pytest must start and pass the first test before the timeout, which
    # took over 15 s on the 2-core machine beside the suite's other worker.
    summary, _ = _run(
        fake_tests, tmp_path, workers=1, timeout_s=60, keyword="half_precision or sleeps"
    )
    assert summary["timed_out"] and summary["returncode"] is None
    # Interrupted, pytest still wrote the report of the test that finished before (and a
    # bare element, no outcome, for the one it stopped).
    assert summary["junit"] == "tests.xml" and summary["passed"] == 1
    assert not device_runner.tests_failed(summary)


def test_junit_outcomes_keep_the_worst_report_of_a_test(tmp_path):
    report = tmp_path / "report.xml"
    report.write_text(
        """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_a" name="test_x[1]" time="0.1"/>
<testcase classname="tests.test_a" name="test_y" time="0.1"><failure message="no"/></testcase>
<testcase classname="tests.test_a" name="test_y" time="0.1"><error message="teardown"/></testcase>
<testcase classname="tests.test_a" name="test_z" time="0.1">
<skipped type="pytest.xfail" message="known"/></testcase>
<testcase time="0.000" />
</testsuite></testsuites>
"""
    )
    assert device_runner.junit_outcomes(str(report)) == {
        "tests.test_a::test_x[1]": "passed",
        "tests.test_a::test_y": "failed",
        "tests.test_a::test_z": "skipped",
    }


def test_the_folders_tests_carry_the_benchmarks_marker(request):
    # Applied by tests/benchmarks/conftest.py, so that `-m benchmarks` selects this folder.
    assert request.node.get_closest_marker("benchmarks") is not None

"""Runs asyncpg's own test suite and writes what happened to a JSON file.

Usage: run.py RESULTS.json [EXCLUDED...]. Run from the directory holding the suite's
tests/ (see setup.sh); the server comes from PGHOST, PGPORT, PGUSER, PGPASSWORD and
PGDATABASE, as asyncpg's test base reads them. A test whose id contains one of EXCLUDED is
not run. Each test gets COMPAT_TEST_TIMEOUT seconds (default 60), and a connection
close() that does not finish within COMPAT_CLOSE_TIMEOUT (default 10) fails the test
instead of hanging the run.
"""

import asyncio
import json
import os
import sys
import unittest

from asyncpg import _testbase as tb

tb.TestCaseMeta.TEST_TIMEOUT = float(os.environ.get("COMPAT_TEST_TIMEOUT", "60"))
CLOSE_TIMEOUT = float(os.environ.get("COMPAT_CLOSE_TIMEOUT", "10"))


def _teardown(self):
    try:
        try:
            self.loop.run_until_complete(self.con.close(timeout=CLOSE_TIMEOUT))
        except asyncio.TimeoutError:
            raise AssertionError("connection close() timed out") from None
        finally:
            self.con = None
    finally:
        tb.ClusterTestCase.tearDown(self)


tb.ConnectedTestCase.tearDown = _teardown


def flatten(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from flatten(t)
        else:
            yield t


class Result(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passed = []

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed.append(test.id())


def last_line(tb_text):
    lines = [line for line in tb_text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def main():
    out, excluded = sys.argv[1], sys.argv[2:]
    tests = [
        t
        for t in flatten(unittest.defaultTestLoader.loadTestsFromName("tests.suite"))
        if not any(e in t.id() for e in excluded)
    ]
    runner = unittest.TextTestRunner(verbosity=1, resultclass=Result)
    r = runner.run(unittest.TestSuite(tests))
    doc = {
        "passed": r.passed,
        "failed": [{"id": t.id(), "why": last_line(tb_text)} for t, tb_text in r.failures + r.errors],
        "skipped": [t.id() for t, _ in r.skipped],
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)


main()

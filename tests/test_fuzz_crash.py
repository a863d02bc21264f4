"""Every probe of the error contract (tests/fuzz_probes.py) run in a subprocess, so that a crash
(a segfault on a NULL data pointer, an abort) is reported as a failure of that probe instead of
ending the test run. One subprocess runs the probes in order; when it dies, the probe it was in is
recorded as crashed and a fresh subprocess continues with the next one."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

import fuzz_probes

import bnbcy

HERE = pathlib.Path(__file__).parent
NAMES = [p.name for p in fuzz_probes.PROBES]


def _run_all():
    results, todo = {}, list(NAMES)
    # the subprocess imports the bnbcy this process tested, and the tests' helpers
    root = pathlib.Path(bnbcy.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(HERE), os.environ.get("PYTHONPATH", "")])}
    while todo:
        proc = subprocess.run([sys.executable, str(HERE / "fuzz_probes.py"), *todo], capture_output=True,
                              text=True, env=env, timeout=300)
        current = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                current = line[6:]
            elif line.startswith("{"):
                r = json.loads(line)
                results[r["probe"]] = r
                current = None
        if proc.returncode == 0 and current is None:
            break
        crashed = current or todo[0]
        results[crashed] = {"probe": crashed, "crashed": proc.returncode, "stderr": proc.stderr[-2000:]}
        todo = todo[todo.index(crashed) + 1:]
    return results


@pytest.fixture(scope="module")
def results():
    return _run_all()


def test_probe_names_are_unique():
    assert len(set(NAMES)) == len(NAMES)


@pytest.mark.parametrize("probe", fuzz_probes.PROBES, ids=NAMES)
def test_probe_raises_documented_exception_in_subprocess(results, probe):
    r = results.get(probe.name)
    assert r is not None, f"probe {probe.name!r} did not report"
    assert "crashed" not in r, f"probe {probe.name!r} crashed the process (exit {r['crashed']}):\n{r['stderr']}"
    assert r["raised"] == probe.exception, (f"{probe.name}: expected {probe.exception}, got {r['raised']} "
                                            f"({r['message']})")
    assert r["unchanged"], f"{probe.name}: the rejected call changed an argument"

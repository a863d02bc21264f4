"""Run a snippet in a fresh interpreter (the bitsandbytes stand-in changes ``sys.modules`` and
``sys.meta_path``, so each scenario gets its own process) and read back what it printed as JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code: str, standin: bool = False, env: dict | None = None, timeout: float = 300,
           cwd: str | None = None) -> dict:
    """Run ``code`` with this checkout first on ``sys.path``.

    ``standin`` sets ``BNBCY_AS_BITSANDBYTES=1`` and has Python's ``site`` process this checkout's
    ``bnbcy-standin.pth`` before the snippet, as it does at start-up for the installed wheel (the
    in-code switch is the snippet's own business). The snippet reports by printing one JSON object
    as its last stdout line; that object is returned.
    """
    full_env = {k: v for k, v in os.environ.items() if k != "BNBCY_AS_BITSANDBYTES"}
    full_env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                        if p and os.path.abspath(p) != ROOT])
    full_env.setdefault("OMP_NUM_THREADS", "2")
    full_env["TOKENIZERS_PARALLELISM"] = "false"
    full_env["HF_HUB_OFFLINE"] = "1"
    if standin:
        full_env["BNBCY_AS_BITSANDBYTES"] = "1"
    full_env.update(env or {})
    code = textwrap.dedent(code)
    if standin:
        code = f"import site; site.addpackage({ROOT!r}, 'bnbcy-standin.pth', set())\n" + code
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=full_env, timeout=timeout, cwd=cwd)
    if res.returncode != 0:
        raise AssertionError(f"snippet failed (rc {res.returncode}):\n--- stdout\n{res.stdout[-4000:]}\n"
                             f"--- stderr\n{res.stderr[-8000:]}")
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    if not lines:
        raise AssertionError(f"snippet printed nothing; stderr:\n{res.stderr[-4000:]}")
    out = json.loads(lines[-1])
    out["_stderr"] = res.stderr
    return out

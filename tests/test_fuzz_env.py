"""Environment variables: parsed in one place (bnbcy/_env.py), a clear error or a one-time warning
naming the variable and its accepted values, never a silent wrap-around."""
import os
import pathlib
import re
import subprocess
import sys
import warnings

import pytest

import bnbcy
from bnbcy import _C, _env

ROOT = pathlib.Path(bnbcy.__file__).resolve().parent.parent


def _fresh_warnings(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    _env._parsed.pop((name, raw), None)


def test_every_environment_read_goes_through_env_module():
    """No other module of bnbcy (Python, Cython or C) parses an environment variable."""
    offenders = []
    for path in list((ROOT / "bnbcy").rglob("*.py")) + list((ROOT / "pyx").rglob("*.pxi")) \
            + list((ROOT / "pyx").rglob("*.pyx")) + list((ROOT / "pyx" / "include").rglob("*.h")):
        if path.name == "_env.py":
            continue
        text = path.read_text()
        for m in re.finditer(r"os\.environ|os\.getenv|getenv\(", text):
            line = text[:m.start()].count("\n") + 1
            # the view layer's change detection of BNBCY_CPU_ISA hands the raw value to _env to parse
            if path.name == "tensor_view.pxi" and 'getenv("BNBCY_CPU_ISA")' in text.splitlines()[line - 1]:
                continue
            offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert not offenders, f"environment read outside bnbcy/_env.py: {offenders}"


def test_every_bnbcy_variable_in_the_sources_is_registered():
    names = set()
    for path in list((ROOT / "bnbcy").rglob("*.py")) + list((ROOT / "pyx").rglob("*.pxi")) + [ROOT / "setup.py"]:
        names |= set(re.findall(r"[\"'](BNBCY_[A-Z0-9_]+)[\"']", path.read_text()))
    names -= {"BNBCY_CUDA_ARCHS"}  # a build-time list of architectures, parsed by setup.py alone
    assert names <= set(_env.VARIABLES), f"unregistered: {sorted(names - set(_env.VARIABLES))}"


@pytest.mark.parametrize("raw,value", [("", False), ("0", False), ("false", False), ("OFF", False),
                                       ("1", True), ("yes", True), (" On ", True)])
def test_flag_values(monkeypatch, raw, value):
    monkeypatch.setenv("BNBCY_CUDA_SYNC", raw)
    assert _env.get("BNBCY_CUDA_SYNC") is value


@pytest.mark.parametrize("name,raw", [("BNBCY_CUDA_SYNC", "maybe"), ("BNBCY_FORCE_NVRTC", "2"),
                                      ("BNBCY_INT8_GEMM", "fast"), ("BNBCY_CPU_ISA", "avx1024")])
def test_bad_switch_or_choice_warns_once(monkeypatch, name, raw):
    _fresh_warnings(monkeypatch, name, raw)
    with pytest.warns(_env.BnbcyEnvWarning, match=rf"{name}=.*accepted") as rec:
        value = _env.get(name)
    assert value == _env.VARIABLES[name].default
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _env.get(name) == value  # no second warning


def test_bad_isa_warns_and_uses_best(monkeypatch):
    monkeypatch.delenv("BNBCY_CPU_ISA", raising=False)
    best = _C.cpu_isa()
    _fresh_warnings(monkeypatch, "BNBCY_CPU_ISA", "sse9")
    with pytest.warns(_env.BnbcyEnvWarning, match="BNBCY_CPU_ISA"):
        assert _C.cpu_isa() == best
    monkeypatch.setenv("BNBCY_CPU_ISA", "scalar")
    assert _C.cpu_isa() == "scalar"  # the C side sees the parsed value at once
    monkeypatch.delenv("BNBCY_CPU_ISA")
    assert _C.cpu_isa() == best


def _pool_limit(raw):
    code = "from bnbcy import _C; print(_C.pool_stats()['limit_bytes'])"
    env = {**os.environ, "BNBCY_CPU_POOL_MB": raw,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("raw", [str(2 ** 44), str(10 ** 20), "-1", "1e3", "lots"])
def test_pool_mb_out_of_range_is_an_error_not_a_wrap(monkeypatch, raw):
    monkeypatch.setenv("BNBCY_CPU_POOL_MB", raw)
    with pytest.raises(ValueError, match="BNBCY_CPU_POOL_MB must be a whole number of megabytes from 0 to "
                                         f"{_env.POOL_MB_MAX}, got"):
        _env.cpu_pool_bytes()


def test_pool_mb_huge_fails_at_first_pool_use():
    """End to end: the pool (C side) gets the parsed value, so 2**44 MB is an error, not a pool turned off."""
    r = _pool_limit(str(2 ** 44))
    assert r.returncode != 0 and "BNBCY_CPU_POOL_MB must be a whole number of megabytes" in r.stderr, r.stderr


def test_pool_mb_largest_value_is_exact():
    r = _pool_limit(str(_env.POOL_MB_MAX))
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == _env.POOL_MB_MAX << 20

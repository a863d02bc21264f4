"""What the wheel and sdist will hold, checked from the packaging configuration (the wheel itself
is built, installed into a fresh virtual environment and smoke-tested by ``.ci/run``)."""
import os
import subprocess
import sys
import tomllib

from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def test_every_subpackage_is_discovered():
    cfg = _pyproject()["tool"]["setuptools"]
    assert isinstance(cfg["packages"], dict), "packages must be discovered (find), not listed"
    find = cfg["packages"]["find"]
    found = set(find_packages(ROOT, include=find["include"]))
    on_disk = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "bnbcy"))
               if "__init__.py" in files}
    assert found == on_disk and {"bnbcy.nn", "bnbcy.optim", "bnbcy.autograd", "bnbcy._ops"} <= found
    assert cfg["py-modules"] == ["_bnbcy_standin"]


def test_package_data_covers_the_data_files():
    import fnmatch
    data = _pyproject()["tool"]["setuptools"]["package-data"]
    pats = data["*"]
    for d, _, files in os.walk(os.path.join(ROOT, "bnbcy")):
        if "__pycache__" in d or "_cuda" in d:
            continue
        for f in files:
            if not f.endswith((".py", ".pyc", ".so")):
                assert any(fnmatch.fnmatch(f, p) for p in pats), f"{os.path.join(d, f)} would not ship"
    assert "_cuda/*" in data["bnbcy"]


def test_sdist_manifest_holds_the_build_inputs():
    with open(os.path.join(ROOT, "MANIFEST.in")) as fh:
        text = fh.read()
    for needed in ("graft pyx", "graft cuda_src", "bnbcy-standin.pth", "_bnbcy_standin.py"):
        assert needed in text


def test_version_single_source():
    import bnbcy
    from bnbcy import _version
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "bnbcy._version.__version__"
    assert bnbcy.__version__ == _version.__version__


def test_pth_hook_is_one_cheap_line():
    """site runs lines starting with ``import``; without the variable the line must not even import
    the hook module."""
    with open(os.path.join(ROOT, "bnbcy-standin.pth")) as fh:
        lines = [ln for ln in fh.read().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("import ")
    env = {k: v for k, v in os.environ.items() if k != "BNBCY_AS_BITSANDBYTES"}
    env["PYTHONPATH"] = ROOT
    code = ("import site, sys; site.addpackage(%r, 'bnbcy-standin.pth', set()); "
            "print('_bnbcy_standin' in sys.modules, 'torch' in sys.modules)" % ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "False"]

"""bnbcy standing in for ``bitsandbytes``: opt-in only, same module objects, metadata, the
integration signals, the warning when the real bitsandbytes is shadowed. Each scenario runs in a
fresh interpreter (``standin_run.run_py``)."""
import importlib.metadata

import pytest

import _bnbcy_standin as hook
from standin_run import run_py

REAL_BNB = importlib.metadata.version("bitsandbytes")   # the reference install (test dependency)

SUBMODULES = ["nn", "nn.modules", "nn.parametrize", "functional", "optim", "optim.optimizer", "optim.adamw",
              "utils", "autograd", "autograd._functions", "_ops"]

PROBE = f"""
import importlib, importlib.metadata, importlib.util, json, sys, warnings
import torch
names = {SUBMODULES!r}
mods = {{n: importlib.import_module("bitsandbytes." + n) for n in names}}
import bitsandbytes as bnb
from bitsandbytes.optim import AdamW, PagedAdamW8bit
import bnbcy
print(json.dumps({{
    "file": bnb.__file__,
    "same_top": bnb is bnbcy,
    "same_sub": {{n: m is importlib.import_module("bnbcy." + n) for n, m in mods.items()}},
    "sys_modules": all(sys.modules["bitsandbytes." + n] is sys.modules["bnbcy." + n] for n in names),
    "version": importlib.metadata.version("bitsandbytes"),
    "spec": importlib.util.find_spec("bitsandbytes") is not None,
    "features": sorted(bnb.features), "devices": sorted(bnb.supported_torch_devices),
    "optim_str": str(AdamW), "paged_str": str(PagedAdamW8bit),
    "isinstance": isinstance(bnbcy.nn.Linear4bit(4, 4), bnb.nn.Linear4bit),
    "ops": [n for n in bnbcy._ops.defined_ops() if not hasattr(torch.ops.bitsandbytes, n.split(".")[0])],
    "ns": hasattr(torch.ops, "bitsandbytes"),
}}))
"""


def _shadow_warnings(stderr):
    return [ln for ln in stderr.splitlines() if "stands in for bitsandbytes" in ln]


def _check_standin(out):
    assert out["same_top"] and all(out["same_sub"].values()), out["same_sub"]
    assert out["sys_modules"]
    assert out["version"] == hook.standin_version() == f"0.50.2+bnbcy{__import__('bnbcy').__version__}"
    assert out["spec"] and out["isinstance"] and out["ns"]
    assert out["features"] == ["multi_backend"]
    assert set(out["devices"]) >= {"cpu", "cuda"}
    assert "bitsandbytes" in out["optim_str"] and "bitsandbytes" in out["paged_str"]  # Trainer's check
    assert out["ops"] == []  # every bnbcy op answers as torch.ops.bitsandbytes too


def test_environment_variable_turns_the_standin_on():
    out = run_py(PROBE, standin=True)
    _check_standin(out)
    # The real bitsandbytes is installed here: one warning naming both.
    (msg,) = _shadow_warnings(out["_stderr"])
    assert f"bitsandbytes {REAL_BNB}" in msg and "bnbcy" in msg


def test_install_as_bitsandbytes_in_code_same_effect_idempotent():
    out = run_py("import bnbcy, warnings\nm = bnbcy.install_as_bitsandbytes()\nassert m is bnbcy\n"
                 "assert bnbcy.install_as_bitsandbytes() is bnbcy\n" + PROBE)
    _check_standin(out)
    assert len(_shadow_warnings(out["_stderr"])) == 1  # once, although installed twice


def test_without_the_opt_in_nothing_changes():
    out = run_py("""
        import importlib.metadata, json, sys
        import bnbcy, torch
        import bitsandbytes as bnb
        from bitsandbytes.optim import AdamW
        print(json.dumps({"real": bnb.__file__, "version": importlib.metadata.version("bitsandbytes"),
                          "hook": "_bnbcy_standin" in sys.modules, "same": bnb is bnbcy,
                          "cls": str(AdamW), "bnbcy_cls": str(bnbcy.optim.AdamW),
                          "finders": [type(f).__name__ for f in sys.meta_path]}))
    """, env={"BNBCY_AS_BITSANDBYTES": "0"})
    assert "site-packages/bitsandbytes" in out["real"] and not out["same"]
    assert out["version"] == REAL_BNB and not out["hook"]
    assert "StandinFinder" not in out["finders"]
    assert out["bnbcy_cls"] == "<class 'bnbcy.optim.adamw.AdamW'>"
    assert not _shadow_warnings(out["_stderr"])


def test_start_up_hook_is_lazy():
    """The .pth hook installs only the finder: neither torch nor bnbcy is imported until
    ``import bitsandbytes`` (so OMP_NUM_THREADS etc. set by the script still count)."""
    out = run_py("""
        import json, sys
        before = {"torch": "torch" in sys.modules, "bnbcy": "bnbcy" in sys.modules,
                  "finder": [type(f).__name__ for f in sys.meta_path][0]}
        import bitsandbytes
        print(json.dumps({**before, "after": "bnbcy" in sys.modules}))
    """, standin=True)
    assert out == {"torch": False, "bnbcy": False, "finder": "StandinFinder", "after": True, "_stderr": out["_stderr"]}


def test_real_bitsandbytes_imported_first_is_refused_cleanly():
    out = run_py("""
        import json, sys
        import bitsandbytes, bnbcy
        finders = list(sys.meta_path)
        try:
            bnbcy.install_as_bitsandbytes()
            err = None
        except RuntimeError as exc:
            err = str(exc)
        print(json.dumps({"err": err, "unchanged": sys.meta_path == finders,
                          "still_real": sys.modules["bitsandbytes"] is bitsandbytes}))
    """)
    assert out["err"] and "imported already" in out["err"] and "install_as_bitsandbytes" in out["err"]
    assert out["unchanged"] and out["still_real"]


def test_missing_submodule_is_a_clear_import_error():
    out = run_py("""
        import json
        try:
            import bitsandbytes.no_such_module
            err = None
        except ModuleNotFoundError as exc:
            err = [str(exc), exc.name]
        print(json.dumps({"err": err}))
    """, standin=True)
    msg, name = out["err"]
    assert name == "bitsandbytes.no_such_module" and "bnbcy" in msg


@pytest.mark.parametrize("value,on", [("1", True), ("yes", True), ("true", True), (" 1 ", True),
                                      ("", False), ("0", False), ("false", False), ("Off", False), ("no", False)])
def test_environment_values(value, on):
    assert hook.requested({"BNBCY_AS_BITSANDBYTES": value}) is on
    assert hook.requested({}) is False


def test_standin_version_is_pep440_and_states_the_api_level():
    from packaging.version import Version
    v = Version(hook.standin_version())
    assert v.public == "0.50.2" and v.local.startswith("bnbcy")
    assert v >= Version("0.46.1")   # transformers' minimum bitsandbytes


def test_build_info_and_integration_signals_on_bnbcy_itself():
    import bnbcy
    assert bnbcy.features == {"multi_backend"} and "cpu" in bnbcy.supported_torch_devices
    assert bnbcy.build_info()["cpu_threads"] >= 1

"""The "how the GPU path was checked" rule of ``python -m bnbcy`` (bnbcy/_gpu_evidence.py)."""
import json
import os
import subprocess
import sys

from bnbcy import _gpu_evidence as E


def _tree(tmp_path):
    for rel, text in {"cuda_src/a.cu": "k", "cuda_src/c.cuh": "h", "pyx/_C.pyx": "x",
                      "pyx/include/h.h": "i", "bnbcy/m.py": "m", "bnbcy/f/r.json": "{}",
                      "setup.py": "s", "docs/x.md": "doc", "bnbcy/_cuda/m.fatbin": "bin"}.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_source_hash_covers_the_gpu_path_only(tmp_path):
    root = _tree(tmp_path)
    assert E.source_files(root) == ["bnbcy/f/r.json", "bnbcy/m.py", "cuda_src/a.cu", "cuda_src/c.cuh",
                                    "pyx/_C.pyx", "pyx/include/h.h", "setup.py"]
    h = E.source_hash(root)
    (root / "docs/x.md").write_text("other docs")
    (root / "bnbcy/_cuda/m.fatbin").write_text("rebuilt")
    assert E.source_hash(root) == h                       # docs and build output do not count
    (root / "cuda_src/a.cu").write_text("k2")
    assert E.source_hash(root) != h
    assert E.source_hash(tmp_path / "nowhere") is None


def test_run_on_gpu_needs_a_result_for_this_source(tmp_path):
    root = _tree(tmp_path)
    assert E._run_on_gpu(root).startswith("no: bench/results/ has no gpu_check.sh result")
    res = root / "bench" / "results"
    res.mkdir(parents=True)
    steps = [{"name": "build", "status": "passed", "gpu_only": False},
             {"name": "cuda-tests", "status": "failed", "gpu_only": True}]
    (res / "gpu_check-old.json").write_text(json.dumps({"source_hash": "0" * 64, "gpu": "H100", "steps": steps}))
    (res / "gpu_check-bad.json").write_text("{not json")
    assert E._run_on_gpu(root).startswith("no:")          # a result for other sources does not count
    no_gpu = [dict(s, status="not-run") if s["gpu_only"] else s for s in steps]
    (res / "gpu_check-cpu.json").write_text(json.dumps({"source_hash": E.source_hash(root), "gpu": "none",
                                                         "steps": no_gpu}))
    assert E._run_on_gpu(root).startswith("no:")          # nor one written without a GPU
    (res / "gpu_check-now.json").write_text(json.dumps(
        {"source_hash": E.source_hash(root), "gpu": "NVIDIA H200", "date_utc": "2026-12-01", "steps": steps}))
    line = E._run_on_gpu(root)
    assert line.startswith("yes: NVIDIA H200 on 2026-12-01, NOT all passed: cuda-tests failed")
    assert "1/2 passed" in line and "gpu_check-now.json" in line
    assert E._run_on_gpu(tmp_path / "nowhere").startswith("unknown:")


def test_evidence_of_this_build():
    ev = E.evidence()
    assert set(ev) == {"compiled", "emulated", "run_on_gpu"}
    assert all(v.startswith(("yes", "no", "unknown", "emulator present")) for v in ev.values())
    lines = E.format_evidence(ev)
    assert lines[0].strip() == "GPU path checked :" and len(lines) == 4


def test_hash_script_runs_without_the_package(tmp_path):
    script = os.path.join(E.ROOT, "bnbcy", "_gpu_evidence.py")
    out = subprocess.run([sys.executable, script, "--source-hash"], capture_output=True, text=True,
                         check=True, cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")}).stdout.strip()
    assert out == E.source_hash()

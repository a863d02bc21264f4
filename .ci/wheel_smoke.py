"""Installed-package smoke test, run by ``.ci/run`` with the python of a fresh virtual environment
into which only torch and bnbcy's wheel were installed (non-editable, no checkout on sys.path):
every module imports, the data files are there, ``python -m bnbcy`` runs, one op per area works,
and the bitsandbytes stand-in works through the installed ``.pth`` hook (and is off without it).
"""
import importlib
import importlib.util
import os
import pkgutil
import subprocess
import sys
import sysconfig

import torch

import bnbcy

HERE = os.path.dirname(os.path.abspath(__file__))
SITE = sysconfig.get_paths()["purelib"]


def check(cond, what):
    if not cond:
        raise SystemExit(f"wheel smoke test FAILED: {what}")
    print(f"  ok  {what}")


def run(args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BNBCY_AS_BITSANDBYTES")}
    env.update(env_extra or {})
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=os.path.expanduser("~"))
    if res.returncode != 0:
        raise SystemExit(f"wheel smoke test FAILED: {' '.join(args)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


print(f"bnbcy {bnbcy.__version__} at {bnbcy.__file__}")
pkg_dir = os.path.dirname(bnbcy.__file__)
check(os.path.realpath(pkg_dir).startswith(os.path.realpath(sys.prefix)), "bnbcy is the venv's installed copy")

modules = sorted(m.name for m in pkgutil.walk_packages(bnbcy.__path__, "bnbcy.") if not m.name.endswith("__main__"))
for name in modules:
    importlib.import_module(name)
check(len(modules) >= 30 and {"bnbcy.nn.modules", "bnbcy.optim.optimizer", "bnbcy.autograd._functions",
                              "bnbcy.nn.parametrize", "bnbcy.nn.embedding_quant", "bnbcy.utils"} <= set(modules),
      f"all {len(modules)} modules import")
for rel in ("_cuda/manifest.json", "functional/int8_gemm_routes.json"):
    check(os.path.isfile(os.path.join(pkg_dir, rel)), f"data file bnbcy/{rel}")
check(os.path.isfile(os.path.join(SITE, "bnbcy-standin.pth")) and os.path.isfile(os.path.join(SITE, "_bnbcy_standin.py")),
      "stand-in hook (.pth + _bnbcy_standin) in site-packages")

# one op per area
F = bnbcy.functional
x = torch.randn(1000)
q, st = F.quantize_blockwise(x, blocksize=64)
check((F.dequantize_blockwise(q, st) - x).abs().max() < 0.05, "8-bit blockwise round trip")
w = torch.randn(64, 128, dtype=torch.bfloat16)
q4, st4 = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
a = torch.randn(2, 128, dtype=torch.bfloat16)
y = bnbcy.matmul_4bit(a, q4.t(), st4)
ref = a.float() @ F.dequantize_4bit(q4, st4).float().t()
check(((y.float() - ref).norm() / ref.norm()) < 0.02, "4-bit quantize + matmul_4bit")
lin = bnbcy.nn.Linear8bitLt(128, 64, has_fp16_weights=False, threshold=6.0).to("cpu")
check(lin(torch.randn(4, 128, dtype=torch.float16)).shape == (4, 64) and lin.weight.dtype == torch.int8,
      "Linear8bitLt forward")
p = torch.nn.Parameter(torch.randn(256, 64))
opt = bnbcy.optim.AdamW8bit([p], lr=1e-2)
before = p.detach().clone()
(p ** 2).sum().backward()
opt.step()
check(not torch.equal(p, before) and opt.state[p]["state1"].dtype == torch.uint8, "AdamW8bit step")
emb = bnbcy.nn.EmbeddingNF4(16, 64).to("cpu")
check(emb(torch.tensor([1, 2])).shape == (2, 64), "EmbeddingNF4 lookup")

out = run(["-m", "bnbcy", "--rows", "256", "--cols", "256", "--blocksizes", "64,256", "--hidden", "128",
           "--ffn", "256", "--optim-steps", "5"])
check("bnbcy " + bnbcy.__version__ in out and "4-bit linear layers" in out, "python -m bnbcy runs")

check(importlib.util.find_spec("bitsandbytes") is None, "without the opt-in: no bitsandbytes")
out = run([os.path.join(HERE, "..", "examples", "bnb_script.py")], {"BNBCY_AS_BITSANDBYTES": "1"})
check("+bnbcy" in out and out.rstrip().endswith("ok"),
      "BNBCY_AS_BITSANDBYTES=1 python examples/bnb_script.py (a script that names only bitsandbytes)")
print("wheel smoke test passed")

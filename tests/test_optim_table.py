"""The one optimizer table (bnbcy/optim/_table.py) against every layer that uses it: the C and
CUDA rule enums, the Cython rule ids, the CUDA kernel names, the functional names, the
optimizer families and the kernels' trust-ratio behaviour."""
import re
from pathlib import Path

import pytest
import torch

import bnbcy._C as C
import bnbcy.functional as F
from bnbcy.functional import _optim_cuda
from bnbcy.optim import _families, _table

ROOT = Path(__file__).resolve().parent.parent


def _enum(path, prefix):
    text = (ROOT / path).read_text()
    return {m.group(1).lower(): int(m.group(2)) for m in re.finditer(rf"\b{prefix}([A-Z]+) = (\d+)", text)}


def test_c_and_cuda_enums_are_the_table():
    assert _enum("pyx/include/bnbcy_cpu_optim.h", "BNBCY_OPT_") == _table.RULE_IDS
    assert _enum("cuda_src/optim.cu", "OPT_") == _table.RULE_IDS
    assert C.OPT_RULE_IDS == _table.RULE_IDS


def test_cuda_kernel_names_come_from_the_table():
    text = (ROOT / "cuda_src/optim.cu").read_text()
    all_names = re.search(r"#define BNBCY_OPT_ALL_NAMES\(M, TR, DT\)(.*?)\n\n", text, re.S).group(1)
    unorm_names = re.search(r"#define BNBCY_OPT_UNORM_NAMES\(M, TR, DT\)(.*?)\n\n", text, re.S).group(1)
    pairs = lambda block: {n: r.lower() for n, r in re.findall(r"M\(TR, DT, (\w+), OPT_(\w+)\)", block)}
    assert pairs(all_names) == {r: r for r in _table.RULE_IDS}
    assert set(pairs(unorm_names)) == {k.rule for k in _table.KERNELS.values() if k.trust_ratio}
    assert set(_optim_cuda.NAMES) == set(_table.RULE_IDS)
    assert {n: _optim_cuda.ALIASES.get(n, n) for n in _table.KERNELS} == {k.name: k.rule for k in _table.KERNELS.values()}


def test_functional_and_families_use_the_table():
    assert F.optim_update.OPTIMIZER_NAMES == _table.OPTIMIZER_NAMES
    for fam in _families.FAMILIES:
        k = _table.kernel(fam.kernel)
        assert k.states == fam.states, fam.name
    with pytest.raises(ValueError, match="Unsupported optimizer name"):
        _table.kernel("adamax")


@pytest.mark.parametrize("name", _table.OPTIMIZER_NAMES)
def test_trust_ratio_use_matches_the_kernels(name):
    k = _table.kernel(name)
    n = 300
    g = torch.linspace(-1, 1, n)
    s1 = torch.zeros((k.state1_lead, n) if k.state1_lead else (n,))
    s2 = torch.zeros(n) if k.states == 2 else None
    u = torch.zeros(1)
    F.optimizer_update_32bit(name, g, torch.ones(n), s1, 0.9, 1e-8, 2, 1e-3, state2=s2, beta2=0.99,
                             beta3=0.999 if name == "ademamix" else 0.0, max_unorm=1.0, unorm_vec=u)
    assert (u.item() > 0) == k.trust_ratio

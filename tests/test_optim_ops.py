"""torch.ops.bnbcy.optimizer_update_32bit / optimizer_update_8bit_blockwise: bitsandbytes'
schemas, torch.library.opcheck, and the functional API going through them."""
import pytest
import torch

import bnbcy.functional as F
from bnbcy.functional.maps import create_dynamic_map

BNB_SCHEMAS = {
    "optimizer_update_32bit":
        "(str optimizer_name, Tensor(a0!) g, Tensor(a1!) p, Tensor(a2!) state1, Tensor(a3!)? state2, Tensor(a4!)? "
        "unorm_vec, float max_unorm, float param_norm, float beta1, float beta2, float beta3, float alpha, float eps, "
        "float weight_decay, int step, float lr, float gnorm_scale, bool skip_zeros=False) -> ()",
    "optimizer_update_8bit_blockwise":
        "(str optimizer_name, Tensor(a0!) g, Tensor(a1!) p, Tensor(a2!) state1, Tensor(a3!)? state2, float beta1, "
        "float beta2, float beta3, float alpha, float eps, int step, float lr, Tensor(a4!) qmap1, Tensor(a5!)? qmap2, "
        "Tensor(a6!) absmax1, Tensor(a7!)? absmax2, float weight_decay, float gnorm_scale, bool skip_zeros=False) -> ()",
}


@pytest.mark.parametrize("name", sorted(BNB_SCHEMAS))
def test_schema_is_bitsandbytes(name):
    schema = str(getattr(torch.ops.bnbcy, name).default._schema)
    assert schema == f"bnbcy::{name}{BNB_SCHEMAS[name]}"


def _args32(name, dtype=torch.float32, n=600):
    g = torch.Generator().manual_seed(0)
    two = name in ("adam", "lamb")
    return (name, torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype),
            torch.rand(n, generator=g), torch.rand(n, generator=g) if two else None,
            torch.zeros(1) if name == "lamb" else None, 1.0 if name == "lamb" else 0.0, 3.0, 0.9, 0.99, 0.0, 0.0,
            1e-8, 0.01, 3, 1e-3, 1.0, False)


def _args8(name, dtype=torch.float32, n=600):
    g = torch.Generator().manual_seed(0)
    two = name == "adam"
    nb = -(-n // 256)
    q1, q2 = create_dynamic_map(signed=True), create_dynamic_map(signed=False)
    return (name, torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype),
            torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8),
            torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) if two else None,
            0.9, 0.99, 0.0, 0.0, 1e-8, 3, 1e-3, q1, q2 if two else None, torch.rand(nb, generator=g),
            torch.rand(nb, generator=g) if two else None, 0.01, 1.0, False)


@pytest.mark.parametrize("name", ["adam", "lamb", "lion"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_32bit(name, dtype):
    torch.library.opcheck(torch.ops.bnbcy.optimizer_update_32bit, _args32(name, dtype))


@pytest.mark.parametrize("name", ["adam", "momentum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_8bit(name, dtype):
    torch.library.opcheck(torch.ops.bnbcy.optimizer_update_8bit_blockwise, _args8(name, dtype))


def test_functional_goes_through_the_ops(monkeypatch):
    seen = []
    for attr in ("optimizer_update_32bit", "optimizer_update_8bit_blockwise"):
        orig = getattr(torch.ops.bnbcy, attr)
        monkeypatch.setattr(torch.ops.bnbcy, attr, lambda *a, _o=orig, _n=attr: (seen.append(_n), _o(*a)))
    a = _args32("adam")
    p_op, s1_op, s2_op = a[2].clone(), a[3].clone(), a[4].clone()
    torch.ops.bnbcy.optimizer_update_32bit(a[0], a[1], p_op, s1_op, s2_op, *a[5:])
    p_f, s1_f, s2_f = a[2].clone(), a[3].clone(), a[4].clone()
    F.optimizer_update_32bit("adam", a[1], p_f, s1_f, 0.9, 1e-8, 3, 1e-3, state2=s2_f, beta2=0.99,
                             weight_decay=0.01)
    assert torch.equal(p_op, p_f) and torch.equal(s1_op, s1_f) and torch.equal(s2_op, s2_f)
    b = _args8("adam")
    p8, q8a, q8b, m1, m2 = b[2].clone(), b[3].clone(), b[4].clone(), b[14].clone(), b[15].clone()
    F.optimizer_update_8bit_blockwise("adam", b[1], p8, q8a, q8b, 0.9, 0.99, 0.0, 0.0, 1e-8, 3, 1e-3, b[12], b[13],
                                      m1, m2, weight_decay=0.01)
    torch.ops.bnbcy.optimizer_update_8bit_blockwise(*b)
    assert torch.equal(p8, b[2]) and torch.equal(q8a, b[3]) and torch.equal(m1, b[14])
    assert seen == ["optimizer_update_32bit"] * 2 + ["optimizer_update_8bit_blockwise"] * 2

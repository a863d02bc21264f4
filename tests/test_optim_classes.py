"""bnbcy.optim: the 39 optimizer classes, their machinery, checkpoints and overrides (CPU).

References: torch.optim for the 32-bit optimizers torch has, float64 re-implementations of
NUMERICS.md §6.3/§6.4 for Lion, LAMB, LARS and AdEMAMix, bitsandbytes 0.50.2 (installed)
for signatures and checkpoint formats.
"""
import copy
import inspect
import io
import json
import math
import os
import re
import warnings

import pytest
import torch

import bnbcy as bnb
from bnbcy.optim import GlobalOptimManager

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.optim as BO
except Exception:  # pragma: no cover - bitsandbytes is a test-only reference
    BO = None
needs_bnb = pytest.mark.skipif(BO is None, reason="bitsandbytes is not installed")

CLASSES = [n for n in bnb.optim.__all__
           if n not in ("GlobalOptimManager", "Optimizer8bit", "Optimizer1State", "Optimizer2State", "PytorchLARS")]
SEED_DOCS = "/work/shared/seeds/bitsandbytes-docs-0.49.1.md"


@pytest.fixture(autouse=True)
def fresh_manager():
    GlobalOptimManager.get_instance().initialize()
    yield
    GlobalOptimManager.get_instance().initialize()


def _grads(shapes, steps, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(steps)]


def _params(shapes, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in opt.state[p].items()}
             for p in params if p in opt.state})


def _assert_same(opt, params, snap):
    ps, st = snap
    for p, q in zip(params, ps):
        assert torch.equal(p.detach(), q)
    now = {id(p): opt.state[p] for p in params if p in opt.state and len(opt.state[p])}
    assert set(now) == {k for k, v in st.items() if len(v)}
    for k, v in now.items():
        assert set(v) == set(st[k])
        for kk, vv in v.items():
            assert (torch.equal(vv, st[k][kk]) if torch.is_tensor(vv) else vv == st[k][kk])


# --------------------------------------------------------------------------- signatures
def test_there_are_39_classes():
    assert len(CLASSES) == 39


def _without_removed(sig):
    return [p for p in sig.parameters.values() if p.name not in ("percentile_clipping", "block_wise")]


@needs_bnb
@pytest.mark.parametrize("name", CLASSES + ["PytorchLARS"])
def test_signature_module_and_docstring_match_bitsandbytes(name):
    ours, theirs = getattr(bnb.optim, name), getattr(BO, name)
    # bnb 0.50.2's parameters, in order, with equal defaults and annotations ...
    assert _without_removed(inspect.signature(ours.__init__)) == list(inspect.signature(theirs.__init__).parameters.values())
    assert ours.__module__.replace("bnbcy", "bitsandbytes") == theirs.__module__
    assert ours.__name__ == name and ours.__qualname__ == name
    doc = inspect.getdoc(ours)
    assert "Parameters\n----------" in doc or name == "PytorchLARS"
    for p in list(inspect.signature(ours.__init__).parameters)[1:]:
        assert re.search(rf"^{p} :", doc, re.M), (name, p)
    # ... and positional calls bind like real functions
    if name in ("SGD", "LARS"):
        ours([torch.nn.Parameter(torch.zeros(3))], 0.1, 0.9)


def _documented_signatures():
    text = open(SEED_DOCS).read()
    out = {}
    for m in re.finditer(r"__init__bitsandbytes\.optim\.(\w+)\.__init__\S*?(\[\{.*?\}\])", text):
        try:
            out[m.group(1)] = json.loads(m.group(2))
        except ValueError:
            pass
    return out


@pytest.mark.skipif(not os.path.exists(SEED_DOCS), reason="bitsandbytes 0.49.1 docs seed not present")
def test_signatures_match_the_0_49_1_documentation():
    docs = _documented_signatures()
    checked = 0
    for name in CLASSES:
        if name not in docs:
            continue
        sig = inspect.signature(getattr(bnb.optim, name).__init__)
        ours = [(p.name, None if p.default is inspect.Parameter.empty else p.default)
                for p in list(sig.parameters.values())[1:]]
        documented = []
        for e in docs[name]:
            val = e["val"].split("=", 1)
            documented.append((e["name"], eval(val[1].strip(), {"typing": __import__("typing")}) if len(val) == 2 else None))
        assert ours == documented, name
        checked += 1
    assert checked >= 30


def test_block_wise_and_percentile_clipping_arguments():
    p = [torch.nn.Parameter(torch.zeros(10))]
    with pytest.raises(ValueError, match="block_wise"):
        bnb.optim.Adam8bit(p, block_wise=False)
    with pytest.raises(ValueError, match="block_wise"):
        bnb.optim.Adam(p, block_wise=False)
    bnb.optim.LAMB(p)                 # documented default block_wise=False is accepted
    bnb.optim.LAMB8bit(p)
    with pytest.raises(ValueError, match="percentile_clipping"):
        bnb.optim.Adam(p, percentile_clipping=101)
    with pytest.raises(ValueError, match="amsgrad"):
        bnb.optim.PagedAdamW8bit(p, amsgrad=True)
    with pytest.raises(ValueError, match="optim_bits"):
        bnb.optim.Adam8bit(p, optim_bits=8)
    with pytest.raises(ValueError, match="optim_bits"):
        bnb.optim.Adagrad8bit(p, optim_bits=32)
    with pytest.raises(ValueError, match="max_unorm"):
        bnb.optim.LAMB8bit(p, max_unorm=0.5)
    with pytest.raises(NotImplementedError):
        bnb.optim.SGD(p, lr=0.1)
    with pytest.raises(NotImplementedError):
        bnb.optim.RMSprop(p, centered=True)
    with pytest.raises(ValueError):
        bnb.optim.Adagrad(p, lr_decay=0.1)
    with pytest.warns(UserWarning, match="nesterov"):
        bnb.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)
    o = bnb.optim.Adam(p, betas="(0.8, 0.99)")
    assert o.param_groups[0]["betas"] == (0.8, 0.99)


# --------------------------------------------------------------------------- 32-bit vs torch.optim
SHAPES = [(37, 29), (300,), (5,)]

TORCH_PAIRS = [
    # bnb decays after the Adam step, torch before: O(lr²·wd) apart per step
    ("Adam32bit", dict(lr=1e-3, weight_decay=0.1), torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-3), torch.optim.AdamW, dict(lr=1e-3)),
    ("PagedAdamW32bit", dict(lr=3e-3, betas=(0.8, 0.99)), torch.optim.AdamW, dict(lr=3e-3, betas=(0.8, 0.99))),
    ("SGD32bit", dict(lr=1e-2, momentum=0.9, weight_decay=1e-2), torch.optim.SGD,
     dict(lr=1e-2, momentum=0.9, weight_decay=1e-2)),
    ("RMSprop32bit", dict(lr=1e-3, alpha=0.9, weight_decay=1e-2), torch.optim.RMSprop,
     dict(lr=1e-3, alpha=0.9, weight_decay=1e-2)),
    ("Adagrad32bit", dict(lr=1e-2, weight_decay=1e-2), torch.optim.Adagrad, dict(lr=1e-2, weight_decay=1e-2)),
]


@pytest.mark.parametrize("name,kw,tcls,tkw", TORCH_PAIRS, ids=[t[0] for t in TORCH_PAIRS])
def test_32bit_matches_torch_optim(name, kw, tcls, tkw):
    grads = _grads(SHAPES, 25)
    a, b = _params(SHAPES), _params(SHAPES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(getattr(bnb.optim, name)(a, **kw), a, grads)
    _run(tcls(b, **tkw), b, grads)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=2e-5, atol=5e-6)


# --------------------------------------------------------------------------- float64 references
def _ref_run(kind, params, grads, lr, betas=(0.9, 0.99), eps=1e-8, wd=0.0, max_unorm=0.0, alpha=0.0,
             t_alpha=None, t_beta3=None):
    ps = [p.detach().double().clone() for p in params]
    s1 = [torch.zeros((2, *p.shape) if kind == "ademamix" else p.shape, dtype=torch.float64) for p in ps]
    s2 = [torch.zeros_like(p) for p in ps]
    for t, gs in enumerate(grads, start=1):
        for i, (p, g) in enumerate(zip(ps, gs)):
            g = g.double()
            if kind == "lion":
                p.mul_(1 - lr * wd)
                d = betas[0] * s1[i] + (1 - betas[0]) * g
                p.sub_(lr * torch.sign(d))
                s1[i] = betas[1] * s1[i] + (1 - betas[1]) * g
            elif kind == "lamb":
                s1[i] = betas[0] * s1[i] + (1 - betas[0]) * g
                s2[i] = betas[1] * s2[i] + (1 - betas[1]) * g * g
                u = (s1[i] / (1 - betas[0] ** t)) / ((s2[i] / (1 - betas[1] ** t)).sqrt() + eps)
                pn, un = p.norm(), u.norm()
                us = max_unorm * pn / un if un > max_unorm * pn else 1.0
                p.sub_(lr * us * u)
                p.mul_(1 - lr * wd)
            elif kind == "lars":
                u = g if t == 1 else s1[i] * betas[0] + g          # trust ratio from the undecayed gradient
                gd = g + wd * p
                s1[i] = gd if t == 1 else s1[i] * betas[0] + gd
                pn, un = p.norm(), u.norm()
                us = max_unorm * pn / un if un > max_unorm * pn else 1.0
                p.sub_(us * lr * s1[i])
            elif kind == "ademamix":
                b1, b2, b3 = betas
                a_t, b3_t = alpha, b3
                if t_alpha:
                    a_t = min(t * alpha / t_alpha, alpha)
                if t_beta3:
                    s = t / t_beta3
                    b3_t = min(math.exp(math.log(b1) * math.log(b3) / ((1 - s) * math.log(b3) + s * math.log(b1))), b3)
                s1[i][0] = b1 * s1[i][0] + (1 - b1) * g
                s1[i][1] = b3_t * s1[i][1] + (1 - b3_t) * g
                s2[i] = b2 * s2[i] + (1 - b2) * g * g
                den = s2[i].sqrt() / math.sqrt(1 - b2 ** t) + eps
                p.sub_(lr * (s1[i][0] / (1 - b1 ** t) + a_t * s1[i][1]) / den)
                p.mul_(1 - lr * wd)
    return ps


REF_CASES = [
    ("Lion32bit", "lion", dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), dict(lr=1e-3, betas=(0.9, 0.99), wd=0.1)),
    ("PagedLion32bit", "lion", dict(lr=1e-3), dict(lr=1e-3, betas=(0.9, 0.99))),
    ("LAMB32bit", "lamb", dict(lr=1e-2, weight_decay=0.01), dict(lr=1e-2, betas=(0.9, 0.999), wd=0.01, max_unorm=1.0)),
    ("LARS32bit", "lars", dict(lr=0.5, momentum=0.9), dict(lr=0.5, betas=(0.9, 0.0), max_unorm=0.02, eps=0.0)),
    ("AdEMAMix32bit", "ademamix", dict(lr=1e-3, weight_decay=0.01),
     dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, wd=0.01)),
    ("AdEMAMix32bit", "ademamix", dict(lr=1e-3, t_alpha=10, t_beta3=15, betas=(0.9, 0.999, 0.999)),
     dict(lr=1e-3, betas=(0.9, 0.999, 0.999), alpha=5.0, wd=0.01, t_alpha=10, t_beta3=15)),
]


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name,kind,kw,rkw", REF_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(REF_CASES)])
def test_32bit_matches_float64_reference(name, kind, kw, rkw):
    grads = _grads(SHAPES, 22, seed=3)
    params = _params(SHAPES, seed=4)
    ref = _ref_run(kind, params, grads, **rkw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = getattr(bnb.optim, name)(params, **kw)
    _run(opt, params, grads)
    for p, r in zip(params, ref):
        # Lion's sign() flips for near-zero momenta: compare almost all elements tightly
        close = torch.isclose(p.detach().double(), r, rtol=1e-4, atol=2e-5)
        if kind == "lion":
            assert close.double().mean().item() > 0.995, name
        else:
            assert close.all(), (name, (p.detach().double() - r).abs().max())


# --------------------------------------------------------------------------- 8-bit vs 32-bit
TRACK = [("Adam", dict(lr=1e-3), 0.05), ("AdamW", dict(lr=1e-3), 0.05), ("AdEMAMix", dict(lr=1e-3), 0.08),
         ("Lion", dict(lr=1e-4), 0.1), ("SGD", dict(lr=1e-2, momentum=0.9), 0.05),
         ("RMSprop", dict(lr=1e-3), 0.08), ("Adagrad", dict(lr=1e-2), 0.05),
         ("LAMB", dict(lr=1e-3), 0.06), ("LARS", dict(lr=1e-2, momentum=0.9), 0.05)]


@pytest.mark.parametrize("fam,kw,bound", TRACK, ids=[t[0] for t in TRACK])
def test_8bit_tracks_32bit(fam, kw, bound):
    shapes = [(64, 80), (4096 + 300,)]
    grads = _grads(shapes, 20, seed=5)
    a, b, p0 = _params(shapes, 6), _params(shapes, 6), _params(shapes, 6)
    o8 = getattr(bnb.optim, fam + "8bit")(a, **kw)
    o32 = getattr(bnb.optim, fam + "32bit")(b, **kw)
    _run(o8, a, grads)
    _run(o32, b, grads)
    assert all(o8.state[p]["state1"].dtype == torch.uint8 for p in a)
    for x, y, z in zip(a, b, p0):
        moved = (y - z).abs().mean()
        assert moved > 0
        assert ((x - y).abs().mean() / moved).item() < bound, fam


def test_mlp_adam8bit_vs_adam32bit_final_loss_within_2_percent():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 32, generator=g)
    W = torch.randn(32, 4, generator=g) / 4
    Y = torch.tanh(X @ W) + 0.3 * torch.randn(2048, 4, generator=g)     # noise floor 0.09
    losses = {}
    for cls in (bnb.optim.Adam8bit, bnb.optim.Adam32bit):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 4))
        opt = cls(model.parameters(), lr=3e-3)
        first = None
        for _ in range(150):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X), Y)
            first = first if first is not None else loss.item()
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses[cls.__name__] = torch.nn.functional.mse_loss(model(X), Y).item()
        assert losses[cls.__name__] < 0.5 * first
        if cls is bnb.optim.Adam8bit:
            assert opt.state[model[0].weight]["state1"].dtype == torch.uint8
    l8, l32 = losses["Adam8bit"], losses["Adam32bit"]
    assert abs(l8 - l32) <= 0.02 * l32, losses


# --------------------------------------------------------------------------- state, overrides, groups
def test_state_layout_as_bitsandbytes():
    p = _params([(64, 80), (10,)])
    o = bnb.optim.AdEMAMix8bit(p)
    _run(o, p, _grads([(64, 80), (10,)], 1))
    st = o.state[p[0]]
    assert st["state1"].shape == (2, 64, 80) and st["state1"].dtype == torch.uint8
    assert st["absmax1"].shape == (2, 20) and st["absmax2"].shape == (20,)
    assert st["qmap1"].shape == (256,) and "unorm_vec" not in st and st["step"] == 1
    assert o.state[p[1]]["state1"].dtype == torch.float32       # below min_8bit_size
    o = bnb.optim.LAMB32bit(p)
    _run(o, p, _grads([(64, 80), (10,)], 1))
    assert o.state[p[0]]["unorm_vec"].shape == (1,)


def test_one_multi_tensor_call_per_group_and_state_kind(monkeypatch):
    from bnbcy.functional import optim_update as F
    calls = []
    for name in ("optimizer_update_32bit_multi", "optimizer_update_8bit_blockwise_multi"):
        orig = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, _o=orig, _n=name, **k: (calls.append((_n, len(a[2]))), _o(*a, **k)))
    shapes = [(64, 80), (5000,), (10,), (7,)]
    p = _params(shapes)
    o = bnb.optim.Adam8bit([{"params": p[:3]}, {"params": p[3:], "lr": 1e-2}])
    _run(o, p, _grads(shapes, 2))
    assert sorted(calls) == sorted([("optimizer_update_8bit_blockwise_multi", 2), ("optimizer_update_32bit_multi", 1),
                                    ("optimizer_update_32bit_multi", 1)] * 2)


def test_param_groups_with_own_hyperparameters():
    shapes = [(50,), (50,)]
    grads = _grads(shapes, 5)
    a, b = _params(shapes), _params(shapes)
    o = bnb.optim.Adam32bit([{"params": [a[0]]}, {"params": [a[1]], "lr": 1e-1, "betas": (0.5, 0.9)}], lr=1e-3)
    _run(o, a, grads)
    r0 = bnb.optim.Adam32bit([b[0]], lr=1e-3)
    r1 = bnb.optim.Adam32bit([b[1]], lr=1e-1, betas=(0.5, 0.9))
    for gs in grads:
        b[0].grad, b[1].grad = gs[0].clone(), gs[1].clone()
        r0.step()
        r1.step()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_global_optim_manager_overrides():
    mng = GlobalOptimManager.get_instance()
    with pytest.raises(RuntimeError):
        GlobalOptimManager()
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    mng.register_parameters(model.parameters())
    mng.override_config(model[0].weight, "optim_bits", 32)
    mng.override_config([model[1].weight], key_value_dict={"lr": 0.0})
    o = bnb.optim.Adam(model.parameters(), lr=1e-3, optim_bits=8)
    w1 = model[1].weight.detach().clone()
    model(torch.randn(3, 64)).sum().backward()
    o.step()
    assert o.state[model[0].weight]["state1"].dtype == torch.float32
    assert o.state[model[1].weight]["state1"].dtype == torch.uint8
    assert torch.equal(model[1].weight.detach(), w1)            # lr 0 override
    assert o.get_config(0, 2, o.param_groups[0])["lr"] == 0.0


@pytest.mark.parametrize("emb_cls", ["Embedding", "StableEmbedding"])
def test_embeddings_get_32bit_state_under_adam8bit(emb_cls):
    emb = getattr(bnb.nn, emb_cls)(1000, 16, padding_idx=0)
    assert torch.all(emb.weight[0] == 0)
    lin = torch.nn.Linear(16, 512)
    o = bnb.optim.Adam8bit(list(emb.parameters()) + list(lin.parameters()))
    out = lin(emb(torch.randint(0, 1000, (8, 5))))
    assert out.dtype == torch.float32
    out.sum().backward()
    o.step()
    assert o.state[emb.weight]["state1"].dtype == torch.float32
    assert o.state[lin.weight]["state1"].dtype == torch.uint8


@needs_bnb
def test_embedding_signatures_match_bitsandbytes():
    import bitsandbytes.nn as BN
    for n in ("Embedding", "StableEmbedding"):
        a = inspect.signature(getattr(bnb.nn, n).__init__).parameters
        b = inspect.signature(getattr(BN, n).__init__).parameters
        assert [(p.name, p.default) for p in a.values()] == [(p.name, p.default) for p in b.values()]


# --------------------------------------------------------------------------- checkpoints
def _roundtrip(name, kw, shapes, pre=4, post=4):
    grads = _grads(shapes, pre + post, seed=9)
    a = _params(shapes)
    o = getattr(bnb.optim, name)(a, **kw)
    _run(o, a, grads[:pre])
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    o2 = getattr(bnb.optim, name)(b, **kw)
    buf.seek(0)
    o2.load_state_dict(torch.load(buf, weights_only=False))
    _run(o, a, grads[pre:])
    _run(o2, b, grads[pre:])
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for k, v in o.state[x].items():
            assert (torch.equal(v, o2.state[y][k]) if torch.is_tensor(v) else v == o2.state[y][k]), k
    return o


@pytest.mark.parametrize("name,kw", [("Adam8bit", {}), ("AdEMAMix8bit", {}), ("SGD32bit", dict(lr=0.1, momentum=0.9)),
                                     ("LAMB", {}), ("Lion8bit", {}), ("Adam32bit", dict(percentile_clipping=10)),
                                     ("RMSprop8bit", {})])
def test_state_dict_round_trip_bit_exact(name, kw):
    o = _roundtrip(name, kw, [(64, 80), (33,)])
    sd = o.state_dict()
    assert sorted(sd["state"][0]) == ["__bnb_optimizer_quant_state__", "step"]
    assert isinstance(sd["state"][0]["step"], int)
    if "percentile_clipping" in kw:
        assert sd["state"][0]["__bnb_optimizer_quant_state__"]["gnorm_vec"].shape == (100,)


@needs_bnb
@pytest.mark.parametrize("name,kw", [("Adam8bit", {}), ("Adam", {}), ("AdEMAMix8bit", {}), ("Lion8bit", {}),
                                     ("SGD8bit", dict(lr=0.1, momentum=0.9)), ("AdamW32bit", {})])
def test_load_bitsandbytes_state_dict(name, kw):
    shapes = [(64, 80), (33,)]
    grads = _grads(shapes, 6, seed=11)
    a = _params(shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ob = getattr(BO, name)(a, **kw)
        _run(ob, a, grads[:3])
    sd = ob.state_dict()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    o = getattr(bnb.optim, name)(b, **kw)
    o.load_state_dict(sd)
    for pa, pb in zip(a, b):
        for k, v in ob.state[pa].items():
            assert (torch.equal(v, o.state[pb][k]) if torch.is_tensor(v) else v == o.state[pb][k]), k
    _run(o, b, grads[3:])                                        # keeps training from bnb's state
    assert o.state[b[0]]["step"] == 6
    # and bnbcy's state_dict loads into bitsandbytes
    ob2 = getattr(BO, name)([torch.nn.Parameter(p.detach().clone()) for p in b], **kw)
    ob2.load_state_dict(o.state_dict())
    assert ob2.state[ob2.param_groups[0]["params"][0]]["step"] == 6


# --------------------------------------------------------------------------- bad input
def _bad_step_leaves_everything(opt, params, exc, match=None):
    snap = _snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.step()
    _assert_same(opt, params, snap)


@pytest.mark.parametrize("warm", [0, 2])
def test_bad_input_leaves_params_and_state_untouched(warm):
    shapes = [(64, 80), (20,)]
    p = _params(shapes)
    o = bnb.optim.Adam8bit(p)
    _run(o, p, _grads(shapes, warm))
    # sparse gradient on the second parameter
    p[0].grad = torch.randn(64, 80)
    p[1].grad = torch.randn(20).to_sparse()
    _bad_step_leaves_everything(o, p, RuntimeError, "sparse")
    # invalid lr set on the group after construction
    p[1].grad = torch.randn(20)
    o.param_groups[0]["lr"] = -1.0
    _bad_step_leaves_everything(o, p, ValueError, "learning rate")
    o.param_groups[0]["lr"] = 1e-3
    # invalid per-parameter override
    GlobalOptimManager.get_instance().override_config(p[1], "betas", (0.9, 1.5))
    _bad_step_leaves_everything(o, p, ValueError, "beta")
    GlobalOptimManager.get_instance().override_config(p[1], "betas", (0.9, 0.999))
    GlobalOptimManager.get_instance().override_config(p[0], "block_wise", False)
    _bad_step_leaves_everything(o, p, ValueError, "block_wise")
    GlobalOptimManager.get_instance().initialize()
    o.step()                                                  # now fine
    assert o.state[p[0]]["step"] == warm + 1


def test_params_on_different_devices_and_complex_rejected():
    a = torch.nn.Parameter(torch.randn(10))
    m = torch.nn.Parameter(torch.randn(10, device="meta"))
    o = bnb.optim.Adam([a, m])
    a.grad, m.grad = torch.randn(10), torch.randn(10, device="meta")
    _bad_step_leaves_everything(o, [a], RuntimeError, "one device")
    with pytest.raises(TypeError, match="complex"):
        bnb.optim.Adam([torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))])
    c = torch.nn.Parameter(torch.randn(4))
    o = bnb.optim.Adam([a, c])
    c.data = torch.randn(4, dtype=torch.complex64)
    c.grad = torch.randn(4, dtype=torch.complex64)
    a.grad = torch.randn(10)
    _bad_step_leaves_everything(o, [a], TypeError, "complex")
    d = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    o = bnb.optim.Adam([a, d])
    d.grad = torch.randn(4, dtype=torch.float64)
    _bad_step_leaves_everything(o, [a], TypeError, "float32")


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1e-8), dict(weight_decay=-0.1),
                                 dict(betas=(0.9,))])
def test_invalid_hyperparameters_raise(bad):
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError):
        bnb.optim.Adam(p, **bad)
    o = bnb.optim.Adam(p)
    q = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError):
        o.add_param_group({"params": [q], **bad})
    assert len(o.param_groups) == 1


# --------------------------------------------------------------------------- percentile clipping
def _ref_clip_scales(grads, percentile):
    vec = torch.zeros(100, dtype=torch.float32)
    out = []
    for t, g in enumerate(grads, start=1):
        n2 = torch.sum(g.double() ** 2).float()
        if t == 1:
            vec.fill_(n2)
        else:
            vec[t % 100] = n2
        cur = vec[t % 100].sqrt()
        clip = torch.sort(vec).values[percentile].sqrt()
        out.append(float(clip / cur) if cur > clip else 1.0)
    return out


def test_percentile_clipping_scales_gradient_spikes():
    shape = (200,)
    grads = [g[0] for g in _grads([shape], 30, seed=13)]
    for t in (10, 20):
        grads[t] = grads[t] * 50.0                                # spikes get clipped
    scales = _ref_clip_scales(grads, 5)
    assert scales[10] < 0.1 and scales[0] == 1.0
    a = _params([shape])
    o = bnb.optim.Adam32bit(a, lr=1e-2, percentile_clipping=5)
    _run(o, a, [[g] for g in grads])
    assert o.state[a[0]]["gnorm_vec"].shape == (100,)
    b = _params([shape])
    r = bnb.optim.Adam32bit(b, lr=1e-2)
    _run(r, b, [[(g.double() * s).float()] for g, s in zip(grads, scales)])
    torch.testing.assert_close(a[0].detach(), b[0].detach(), rtol=1e-4, atol=1e-5)
    c = _params([shape])
    _run(bnb.optim.Adam32bit(c, lr=1e-2), c, [[g] for g in grads])
    assert (c[0] - b[0]).abs().max() > 1e-3                      # clipping changed the trajectory
    assert "gnorm_vec" not in bnb.optim.Adam32bit(c).state


# --------------------------------------------------------------------------- paged, schedulers, closures
def test_paged_on_cpu_equals_unpaged():
    # paging itself is tested in test_paged.py (host-backed on the CPU, without a warning)
    shapes = [(64, 80), (5000,)]
    grads = _grads(shapes, 5)
    a, b = _params(shapes), _params(shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(bnb.optim.PagedAdamW8bit(a), a, grads)
    _run(bnb.optim.AdamW8bit(b), b, grads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_lr_scheduler_closure_zero_grad():
    shapes = [(30,)]
    grads = _grads(shapes, 12)
    a, b = _params(shapes), _params(shapes)
    oa = bnb.optim.AdamW32bit(a, lr=1e-2, weight_decay=0.0)
    ob = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.0)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=3, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=3, gamma=0.5)
    for gs in grads:
        def closure():
            a[0].grad = gs[0].clone()
            return torch.tensor(1.5)
        assert oa.step(closure).item() == 1.5
        b[0].grad = gs[0].clone()
        ob.step()
        sa.step()
        sb.step()
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"] == 1e-2 * 0.5 ** 4
    torch.testing.assert_close(a[0].detach(), b[0].detach(), rtol=2e-5, atol=2e-6)
    oa.zero_grad()
    assert a[0].grad is None
    before = a[0].detach().clone()
    oa.step()                                                    # no grads: nothing happens
    assert torch.equal(before, a[0])

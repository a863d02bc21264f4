"""The optimizer step either happens whole or not at all: every bad input raises before any
parameter, state tensor, step counter or new state entry has changed (compared bit for bit);
zero-size parameters step as in torch.optim; GlobalOptimManager holds modules weakly."""
import gc
import weakref

import pytest
import torch

import bnbcy as bnb
import bnbcy.functional as F
from bnbcy.optim import GlobalOptimManager

QUANT = "__bnb_optimizer_quant_state__"
CLASSES = [n for n in bnb.optim.__all__ if (n.endswith("8bit") or n.endswith("32bit")) and not n.startswith(("Paged", "Optimizer"))]
EIGHT = [n for n in CLASSES if n.endswith("8bit")]
SHAPES = [(64, 80), (10,)]


@pytest.fixture(autouse=True)
def fresh_manager():
    GlobalOptimManager.get_instance().initialize()
    yield
    GlobalOptimManager.get_instance().initialize()


def _make(name, shapes=SHAPES, **kw):
    g = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    kw.setdefault("lr", 1e-3)
    if name.startswith(("SGD", "LARS")):
        kw.setdefault("momentum", 0.9)
    return bnb.optim.__dict__[name](ps, **kw), ps


def _grads(ps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _bits(x):
    """A comparable, bit-exact image of a state_dict / tensor tree."""
    if isinstance(x, torch.Tensor):
        return ("T", x.dtype, tuple(x.shape), x.detach().reshape(-1).contiguous().view(torch.uint8).clone())
    if isinstance(x, dict):
        return {k: _bits(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_bits(v) for v in x)
    return x


def _same(a, b):
    if isinstance(a, tuple) and a and a[0] == "T":
        return isinstance(b, tuple) and a[:3] == b[:3] and torch.equal(a[3], b[3])
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _assert_step_raises(opt, ps, exc, match=None):
    before = _bits(([p.detach() for p in ps], opt.state_dict()))
    nstate = len(opt.state)
    with pytest.raises(exc, match=match):
        opt.step()
    assert len(opt.state) == nstate
    assert _same(before, _bits(([p.detach() for p in ps], opt.state_dict())))


def _corrupt(opt, ps, edit):
    """Load a state_dict in which ``edit(state_of_param_0)`` changed the first parameter's state."""
    sd = opt.state_dict()
    st = sd["state"][0]
    st.update(st.pop(QUANT, {}))
    edit(st)
    opt.load_state_dict(sd)
    _grads(ps, 1)


@pytest.mark.parametrize("name", CLASSES)
def test_bad_loaded_state_changes_nothing(name):
    opt, ps = _make(name, min_8bit_size=0) if name in EIGHT else _make(name)
    _grads(ps)
    opt.step()
    edits = [
        (lambda st: st.__setitem__("state1", st["state1"].flatten()[:-1].clone()), ValueError, "state1"),
        (lambda st: st.__setitem__("state1", st["state1"].to(torch.float16)), ValueError, "state1"),
        (lambda st: st.__setitem__("step", -5), ValueError, "step"),
        (lambda st: st.__setitem__("step", 2.5), ValueError, "step"),
        (lambda st: st.__setitem__("step", torch.tensor(3)), ValueError, "step"),
        (lambda st: st.__setitem__("step", 2**31 - 1), ValueError, "step"),
    ]
    if name in EIGHT:
        edits += [
            (lambda st: st.__setitem__("qmap1", st["qmap1"][:255].clone()), ValueError, "qmap1"),
            (lambda st: st.pop("absmax1"), KeyError, "absmax1"),
        ]
    for edit, exc, match in edits:
        fresh, fps = _make(name, min_8bit_size=0) if name in EIGHT else _make(name)
        fresh.load_state_dict(opt.state_dict())
        _corrupt(fresh, fps, edit)
        _assert_step_raises(fresh, fps, exc, match)


@pytest.mark.parametrize("name", ["Adam8bit", "Lion32bit", "AdEMAMix8bit", "LAMB32bit"])
def test_changed_parameter_shape_changes_nothing(name):
    opt, ps = _make(name)
    _grads(ps)
    opt.step()
    with torch.no_grad():
        ps[0].data = torch.randn(80, 64)            # same count, other shape
    _grads(ps, 1)
    _assert_step_raises(opt, ps, ValueError, "state1")
    with torch.no_grad():
        ps[0].data = torch.randn(60, 80)
    _grads(ps, 2)
    _assert_step_raises(opt, ps, ValueError, "state1")


def test_second_group_error_leaves_first_group_alone():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(64, 80, generator=g)) for _ in range(2))
    opt = bnb.optim.Adam8bit([{"params": [a]}, {"params": [b], "lr": 1e-2}])
    _grads([a, b])
    opt.step()
    sd = opt.state_dict()
    sd["state"][1][QUANT]["state2"] = sd["state"][1][QUANT]["state2"][:10].clone()
    opt.load_state_dict(sd)
    c = torch.nn.Parameter(torch.randn(5000, generator=g))   # a new param: no state may appear
    opt.add_param_group({"params": [c]})
    _grads([a, b, c], 1)
    _assert_step_raises(opt, [a, b, c], ValueError, "state2")
    assert c not in opt.state


def test_new_state_not_created_when_a_later_group_fails():
    opt, ps = _make("Adam32bit")
    bad = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))   # unsupported dtype, second group
    opt.add_param_group({"params": [bad]})
    _grads(ps + [bad])
    _assert_step_raises(opt, ps + [bad], TypeError, "float32")
    assert len(opt.state) == 0


def test_ademamix_schedule_error_changes_nothing():
    opt, ps = _make("AdEMAMix8bit", betas=(0.0, 0.999, 0.9999), t_beta3=10)
    _grads(ps)
    _assert_step_raises(opt, ps, ValueError, "t_beta3")
    assert len(opt.state) == 0
    with pytest.raises(ValueError, match="t_alpha"):
        o, q = _make("AdEMAMix32bit", t_alpha=-3)
        _grads(q)
        o.step()


@pytest.mark.parametrize("name", ["Adam8bit", "SGD32bit", "Lion8bit", "AdEMAMix32bit"])
def test_zero_size_parameter_steps_like_torch(name):
    opt, ps = _make(name, shapes=[(64, 80), (0,), (0, 7)])
    before = ps[0].detach().clone()
    _grads(ps)
    opt.step()
    opt.step()
    assert not torch.equal(before, ps[0])
    assert [opt.state[p]["step"] for p in ps] == [2, 2, 2]       # torch.optim counts their steps too
    assert ps[1].shape == (0,) and ps[2].shape == (0, 7)


def test_unorm_vec_validated_before_the_update():
    p, g, s1, s2 = torch.randn(300), torch.randn(300), torch.zeros(300), torch.zeros(300)
    p0 = p.clone()
    for bad, match in ((torch.zeros(0), "unorm_vec.*empty"), (torch.zeros(1, dtype=torch.int8), "unorm_vec.*float32"),
                       (torch.zeros(2), "unorm_vec.*one element")):
        with pytest.raises(ValueError, match=match):
            F.optimizer_update_32bit("lamb", g, p, s1, 0.9, 1e-8, 1, 1e-3, state2=s2, beta2=0.999,
                                     max_unorm=1.0, unorm_vec=bad)
        assert torch.equal(p, p0) and not s1.any() and not s2.any()
    u = torch.zeros(1)
    F.optimizer_update_32bit("lamb", g, p, s1, 0.9, 1e-8, 1, 1e-3, state2=s2, beta2=0.999, max_unorm=1.0,
                             unorm_vec=u)
    assert u.item() > 0 and not torch.equal(p, p0)


def test_manager_holds_modules_weakly():
    mng = GlobalOptimManager.get_instance()
    mods = [torch.nn.Embedding(4, 3) for _ in range(50)]
    refs = [weakref.ref(m) for m in mods]
    for m in mods:
        mng.register_module_override(m, "weight", {"optim_bits": 32})
    assert len(mng.module_weight_config_triple) == 50
    del mods, m
    gc.collect()
    assert all(r() is None for r in refs)
    assert mng.module_weight_config_triple == []
    keep = torch.nn.Embedding(5000, 2)       # a live module's override still applies
    mng.register_module_override(keep, "weight", {"optim_bits": 32})
    opt = bnb.optim.Adam8bit(keep.parameters())
    keep.weight.grad = torch.randn_like(keep.weight)
    opt.step()
    assert opt.state[keep.weight]["state1"].dtype == torch.float32


@pytest.fixture
def capturing(monkeypatch):
    """torch reports a CUDA-graph capture in progress (no GPU here: the refusal is checked with the
    CUDA path run by the SIMT emulator on CPU tensors)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.mark.parametrize("name", ["Adam8bit", "Lion32bit", "AdEMAMix8bit"])
def test_cuda_graph_capture_is_refused_before_anything_changes(capturing, name):
    from bnbcy import kernels
    opt, ps = _make(name, min_8bit_size=0)
    _grads(ps)
    with kernels.emulate():
        _assert_step_raises(opt, ps, RuntimeError, "CUDA graph")
        assert len(opt.state) == 0
    opt.step()                                   # CPU kernels: nothing to capture, the step runs
    assert all(opt.state[p]["step"] == 1 for p in ps)


def test_functional_update_refused_under_capture(capturing):
    from bnbcy import kernels
    p, g, s1, s2 = torch.randn(300), torch.randn(300), torch.zeros(300), torch.zeros(300)
    c1, c2, a1, a2 = (torch.zeros(300, dtype=torch.uint8), torch.zeros(300, dtype=torch.uint8), torch.zeros(2),
                      torch.zeros(2))
    q1, q2 = F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False)
    p0 = p.clone()
    with kernels.emulate():
        with pytest.raises(RuntimeError, match="CUDA graph"):
            F.optimizer_update_32bit("adam", g, p, s1, 0.9, 1e-8, 1, 1e-3, state2=s2, beta2=0.999)
        with pytest.raises(RuntimeError, match="CUDA graph"):
            F.optimizer_update_8bit_blockwise("adam", g, p, c1, c2, 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-3, q1, q2,
                                              a1, a2)
    assert torch.equal(p, p0) and not s1.any() and not s2.any() and not c1.any() and not a1.any()

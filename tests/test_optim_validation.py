"""The one validation layer of the optimizer updates (bnbcy/optim/_validation.py): both entries
validate there once, the layers below trust its record."""
import pytest
import torch

import bnbcy as bnb
import bnbcy.functional as F
from bnbcy import _arrays
from bnbcy.functional import _optim_cuda as OC
from bnbcy.functional import optim_update as OU
from bnbcy.optim import _validation as V


def _model(cls, n=3, size=300, **kw):
    g = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(size, generator=g)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(size, generator=g)
    return cls(ps, **kw), ps


@pytest.mark.parametrize("cls,kw", [(bnb.optim.Adam8bit, {"min_8bit_size": 0}), (bnb.optim.LAMB32bit, {}),
                                    (bnb.optim.Lion8bit, {"min_8bit_size": 0})])
def test_step_validates_once_and_views_each_tensor_once(monkeypatch, cls, kw):
    opt, ps = _model(cls, **kw)
    opt.step()                                    # states exist from here on
    made = []
    orig = V.view
    monkeypatch.setattr(V, "view", lambda t, name: (made.append(id(t)), orig(t, name))[1])

    def refuse(*a, **k):
        raise AssertionError("the array-level checks ran again inside a validated step")
    for name in ("update_32bit", "update_8bit", "_inplace_view"):
        monkeypatch.setattr(V, name, refuse)
    monkeypatch.setattr(_arrays, "input_view", refuse)
    monkeypatch.setattr(_arrays, "output_view", refuse)
    before = [p.detach().clone() for p in ps]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, ps))
    assert len(made) == len(set(made))            # no tensor viewed twice (the shared qmaps once)
    tensors = {id(t) for p in ps for t in opt.state[p].values() if isinstance(t, torch.Tensor)}
    assert tensors | {id(p) for p in ps} | {id(p.grad) for p in ps} == set(made)


def test_functional_entry_returns_the_validated_record():
    p, g, s1, s2 = torch.randn(300), torch.randn(300), torch.zeros(300), torch.zeros(300)
    u = V.update_32bit("lamb", [g], [p], [s1], [s2], 7, 0.9, 0.999, 0.0, 0.0, 1e-8, 0.01, 1e-3,
                       unorm_vecs=[torch.zeros(1)], max_unorm=1.0)
    assert u.kernel.rule == "adam" and not u.eight and u.steps == [7] and not u.cuda
    assert u.hyper == V.Hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, max_unorm=1.0)
    assert [v.numel for v in u.p + u.g + u.s1 + u.s2] == [300] * 4 and u.groups == {"float32": [0]}
    OU.run(u)
    assert s1.any() and s2.any()


@pytest.mark.parametrize("step", [2**31, -1, 0, 2.0, True])
def test_step_range_refused(step):
    p, g, s = torch.randn(10), torch.randn(10), torch.zeros(10)
    with pytest.raises(ValueError, match="step must be a positive int"):
        F.optimizer_update_32bit("momentum", g, p, s, 0.9, 0.0, step, 0.1)
    assert not s.any()


def test_messages_say_what_was_expected():
    p, g = torch.randn(300), torch.randn(300)
    c, a = torch.zeros(300, dtype=torch.uint8), torch.zeros(2)
    q = F.create_dynamic_map(signed=True)
    with pytest.raises(ValueError, match=r"qmap1 \(the 256 values of the signed dynamic map\) must have 256"):
        F.optimizer_update_8bit_blockwise("momentum", g, p, c, None, 0.9, 0, 0, 0, 0, 1, 0.1, q[:255], None, a, None)
    with pytest.raises(ValueError, match=r"absmax1 \(one value per 256 elements\) must have 2 elements"):
        F.optimizer_update_8bit_blockwise("momentum", g, p, c, None, 0.9, 0, 0, 0, 0, 1, 0.1, q, None,
                                          torch.zeros(3), None)
    with pytest.raises(ValueError, match="adam's state2 is required"):
        F.optimizer_update_32bit("adam", g, p, torch.zeros(300), 0.9, 1e-8, 1, 1e-3)
    with pytest.raises(ValueError, match=r"ademamix state1 must have shape \(2, 300\)"):
        F.optimizer_update_32bit("ademamix", g, p, torch.zeros(600), 0.9, 1e-8, 1, 1e-3, state2=torch.zeros(300))


def test_aliased_state_refused_before_the_step():
    opt, ps = _model(bnb.optim.Adam32bit)
    opt.step()
    st = opt.state[ps[1]]
    st["state2"] = st["state1"]                   # one tensor as both moments
    before = [p.detach().clone() for p in ps]
    steps = [opt.state[p]["step"] for p in ps]
    s1 = st["state1"].clone()
    with pytest.raises(ValueError, match="must not share memory"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, ps))
    assert [opt.state[p]["step"] for p in ps] == steps and torch.equal(st["state1"], s1)


def test_cuda_launcher_validates_through_the_layer():
    p, g, s = torch.randn(10), torch.randn(10), torch.zeros(10)
    with pytest.raises(ValueError, match="need CUDA arrays"):
        OC.launch_update_32bit("momentum", [p], [g], [s], None, None, 1, None, 0.9, 0, 0, 0, 0, 0, 0.1)
    with pytest.raises(ValueError, match="state1 must have 10 elements"):
        OC.launch_update_32bit("momentum", [p], [g], [torch.zeros(9)], None, None, 1, None, 0.9, 0, 0, 0, 0, 0, 0.1)
    assert not s.any()


@pytest.mark.parametrize("per_param", [False, True])
def test_non_contiguous_parameter_viewed_again_after_it_is_made_contiguous(per_param):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 300, generator=g)
    grad = torch.randn(300, 40, generator=g)
    a = torch.nn.Parameter(w.clone().t())               # non-contiguous
    b = torch.nn.Parameter(w.clone().t().contiguous())
    a.grad, b.grad = grad.clone(), grad.clone()
    oa, ob = bnb.optim.Adam8bit([a], min_8bit_size=0), bnb.optim.Adam8bit([b], min_8bit_size=0)
    for _ in range(2):
        if per_param:
            oa.update_step(oa.param_groups[0], a, 0, 0)
            ob.update_step(ob.param_groups[0], b, 0, 0)
        else:
            oa.step()
            ob.step()
    assert a.is_contiguous() and torch.equal(a, b)
    assert torch.equal(oa.state[a]["state1"], ob.state[b]["state1"])

"""The optimizer step's cached layouts (bnbcy/optim/_validation.py, Layout): a step that reuses what
an earlier step checked behaves exactly as one that checks everything again.

Each case runs two identical optimizers over identical parameters through a few steps, applies the
same change to both between steps, and steps again: ``cached`` keeps its layouts, ``fresh`` forgets
them before every step (the full check). Parameters, gradients, state tensors and step counters must
agree bit for bit afterwards, or both steps must raise the same error and change nothing.
"""
import copy

import pytest
import torch

import bnbcy as bnb
from bnbcy.optim import _validation as V

CLASSES = [(bnb.optim.Adam32bit, {}), (bnb.optim.Adam8bit, {"min_8bit_size": 0}),
           (bnb.optim.Lion8bit, {"min_8bit_size": 0}), (bnb.optim.AdEMAMix8bit, {"min_8bit_size": 0}),
           (bnb.optim.LAMB32bit, {})]
SHAPES = [(300,), (16, 20), (17,)]


def _params(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in SHAPES]
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(device)
    return ps


class _Fresh:
    """Steps with every layout forgotten first: the full check of every parameter."""

    def __init__(self, opt):
        self.opt = opt

    def step(self):
        self.opt._forget_layouts()
        return self.opt.step()


def _pair(cls, kw, steps=3, device="cpu"):
    pa, pb = _params(device=device), _params(device=device)
    a, b = cls(pa, **kw), cls(pb, **kw)
    for _ in range(steps):
        a.step()
        _Fresh(b).step()
    assert len(a._layouts) == len(pa)               # the cached one does reuse layouts from here on
    return (a, pa), (b, pb)


def _snapshot(opt, ps):
    out = [p.detach().clone() for p in ps]
    out += [p.grad.to_dense() if p.grad.is_sparse else p.grad.clone() for p in ps if p.grad is not None]
    for p in ps:
        for k, v in sorted(opt.state[p].items()):
            out.append((k, v.clone() if isinstance(v, torch.Tensor) else v))
    return out


def _same(x, y):
    assert len(x) == len(y)
    for u, v in zip(x, y):
        if isinstance(u, tuple):
            assert u[0] == v[0]
            u, v = u[1], v[1]
        if isinstance(u, torch.Tensor):
            assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v), (u, v)
        else:
            assert u == v


def _step_both(a, pa, b, pb):
    """Step both; they must agree: same results, or the same error and nothing changed."""
    errors = []
    for opt, ps, step in ((a, pa, a.step), (b, pb, _Fresh(b).step)):
        before = _snapshot(opt, ps)
        try:
            step()
            errors.append(None)
        except Exception as exc:                   # noqa: BLE001 - compared below
            errors.append((type(exc), str(exc).split(",")[0]))
            _same(before, _snapshot(opt, ps))      # a raising step changes nothing
    assert errors[0] == errors[1]
    _same(_snapshot(a, pa), _snapshot(b, pb))
    return errors[0]


def _both(change, device="cpu"):
    """Apply ``change(opt, ps)`` to both optimizers of a pair."""
    def run(cls, kw):
        (a, pa), (b, pb) = _pair(cls, kw, device=device)
        change(a, pa)
        change(b, pb)
        err = _step_both(a, pa, b, pb)
        for _ in range(2):                         # and the steps after it
            if err is None:
                err = _step_both(a, pa, b, pb)
        return err
    return run


def _new_grads(opt, ps):
    for p in ps:                                   # what zero_grad(set_to_none=True) and backward give
        p.grad = p.grad.clone() * 1.5


def _reassign(opt, ps):
    with torch.no_grad():
        ps[0].data = ps[0].data.clone() * 0.5


def _reshape(opt, ps):
    ps[1].data = ps[1].data.reshape(20, 16)
    ps[1].grad = ps[1].grad.reshape(20, 16)


def _half(opt, ps):
    ps[2].data = ps[2].data.half()
    ps[2].grad = ps[2].grad.half()


def _grad_dtype(opt, ps):
    g = ps[0].grad                                 # torch refuses such a .grad; .data is not checked
    g.data = g.data.double()


def _grad_shape(opt, ps):
    g = ps[0].grad
    g.data = g.data[:-1].clone()


def _grad_aliases_state(opt, ps):
    st = opt.state[ps[0]]
    if st["state1"].dtype == torch.float32:        # a gradient in the memory of a state tensor
        ps[0].grad = st["state1"].view(-1)[:ps[0].numel()].view(ps[0].shape)
    else:                                          # 8-bit states: one in the parameter's own memory
        ps[0].grad = ps[0].detach()


def _lr(opt, ps):
    opt.param_groups[0]["lr"] = 0.05


def _bad_betas(opt, ps):
    opt.param_groups[0]["betas"] = (1.5,) + tuple(opt.param_groups[0]["betas"][1:])


def _args(opt, ps):
    opt.args.skip_zeros = True
    ps[0].grad[:10] = 0


def _override(opt, ps):
    bnb.optim.GlobalOptimManager.get_instance().override_config(ps[1], "lr", 0.2)


def _state_replaced(opt, ps):
    st = opt.state[ps[0]]
    st["state1"] = st["state1"].roll(1)           # a new tensor, of other values


def _state_wrong_shape(opt, ps):
    st = opt.state[ps[1]]
    st["state1"] = st["state1"].reshape(-1)[:-1].clone()


def _state_resized(opt, ps):
    opt.state[ps[2]]["state1"].resize_(3)


def _state_moved(opt, ps):
    t = opt.state[ps[0]]["state1"]
    t.data = t.data.clone()                        # same object, new memory (as state offloading does)


def _step_edited(opt, ps):
    opt.state[ps[0]]["step"] = 40


def _step_bad(opt, ps):
    opt.state[ps[0]]["step"] = -1


def _step_removed(opt, ps):
    st = opt.state[ps[0]]
    del st["step"]
    st["other"] = 1                                # as many keys as before


def _state_dropped(opt, ps):
    opt.state[ps[2]].clear()                       # starts again from a fresh state


def _state_key_dropped(opt, ps):
    del opt.state[ps[1]]["state1"]


def _load_state_dict(opt, ps):
    other = type(opt)(_params(seed=5, device=ps[0].device), min_8bit_size=opt.args.min_8bit_size)
    for _ in range(2):
        other.step()
    opt.load_state_dict(copy.deepcopy(other.state_dict()))


def _no_grad(opt, ps):
    ps[1].grad = None


CHANGES = [_new_grads, _reassign, _reshape, _half, _grad_dtype, _grad_shape, _grad_aliases_state, _lr,
           _bad_betas, _args, _override, _state_replaced, _state_wrong_shape, _state_resized, _state_moved,
           _step_edited, _step_bad, _step_removed, _state_dropped, _state_key_dropped, _load_state_dict, _no_grad]
RAISES = {_reshape, _grad_dtype, _grad_shape, _grad_aliases_state, _bad_betas, _state_wrong_shape, _state_resized,
          _step_bad, _step_removed, _state_key_dropped}


@pytest.fixture(autouse=True)
def _no_overrides():
    mng = bnb.optim.GlobalOptimManager.get_instance()
    mng.initialize()
    yield
    mng.initialize()


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("cls,kw", CLASSES, ids=lambda x: getattr(x, "__name__", ""))
def test_cached_step_equals_full_check(cls, kw, change):
    err = _both(change)(cls, kw)
    assert (err is not None) == (change in RAISES), err


@pytest.mark.parametrize("cls,kw", CLASSES[:2], ids=lambda x: getattr(x, "__name__", ""))
def test_lr_tensor_edited_in_place(cls, kw):
    """A tensor in the config can change in place: such a config is resolved afresh every step."""
    (a, pa), (b, pb) = _pair(cls, kw)
    for opt in (a, b):
        opt.param_groups[0]["lr"] = torch.tensor(1e-3)
    _step_both(a, pa, b, pb)
    for opt in (a, b):
        opt.param_groups[0]["lr"].fill_(-1.0)      # invalid: refused by the full check
    assert _step_both(a, pa, b, pb) is not None
    for opt in (a, b):
        opt.param_groups[0]["lr"].fill_(0.1)
    assert _step_both(a, pa, b, pb) is None


def test_layouts_reused_and_released():
    (a, pa), _ = _pair(bnb.optim.Adam8bit, {"min_8bit_size": 0})
    made, viewed = [], []
    orig, orig_view = V.Layout, V.view
    try:
        V.Layout = lambda *args: made.append(1) or orig(*args)
        V.view = lambda t, name: viewed.append(id(t)) or orig_view(t, name)
        a.step()
    finally:
        V.Layout, V.view = orig, orig_view
    assert not made                                # nothing checked again
    assert sorted(viewed) == sorted(id(p.grad) for p in pa)   # only the gradients are viewed again
    a.param_groups[0]["params"] = pa[:1]
    for p in pa[1:]:
        del a.state[p]
    a.step()
    assert list(a._layouts) == [id(pa[0])]         # layouts of parameters that left the groups go
    a.load_state_dict(a.state_dict())
    assert not a._layouts                          # a loaded state is checked in full


def _two_groups(cls, kw):
    pa, pb = _params(), _params()
    opts = [cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 1e-2}], **kw) for ps in (pa, pb)]
    for _ in range(3):
        opts[0].step()
        _Fresh(opts[1]).step()
    return (opts[0], pa), (opts[1], pb)


@pytest.mark.parametrize("cls,kw", CLASSES[:2], ids=lambda x: getattr(x, "__name__", ""))
def test_two_groups(cls, kw):
    """Hyper-parameters edited in one group only; a gradient of one group in the memory of the
    other group's parameter (the overlap check spans the groups)."""
    (a, pa), (b, pb) = _two_groups(cls, kw)
    for opt in (a, b):
        opt.param_groups[1]["lr"] = 0.3
    assert _step_both(a, pa, b, pb) is None
    for ps in (pa, pb):
        ps[2].grad = ps[0].detach().view(-1)[:ps[2].numel()].view(ps[2].shape)
    assert _step_both(a, pa, b, pb) is not None


def test_stale_layout_let_go():
    """A layout that no longer holds gives up what it references (the replaced state) at once."""
    (a, pa), _ = _pair(bnb.optim.Adam32bit, {})
    old = a._layouts[id(pa[0])]
    a.state[pa[0]] = {}                            # a reset of that parameter's state
    a.step()
    assert id(pa[0]) not in a._layouts or a._layouts[id(pa[0])] is not old
    a.step()
    assert a._layouts[id(pa[0])] is not old and a._layouts[id(pa[0])].state is a.state[pa[0]]


@pytest.mark.parametrize("grad", ["sparse", "complex", "float64"])
def test_new_gradient_refused_as_by_the_full_check(grad):
    """A new gradient of a parameter with a layout is refused with the full check's error."""
    (a, pa), (b, pb) = _pair(bnb.optim.Adam32bit, {})
    for ps in (pa, pb):
        g = ps[2].grad
        if grad == "sparse":
            ps[2].grad = g.to_sparse()
        elif grad == "complex":
            g.data = g.data.to(torch.complex64)
        else:
            g.data = g.data.double()
    assert _step_both(a, pa, b, pb) is not None

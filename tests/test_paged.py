"""Paged optimizer state (bnbcy/optim/paged.py).

On the CPU the paged path runs with host backing: the same buffers are paged, registered,
prefetched and evicted under the same budget rule as CUDA managed memory. The GPU test
trains with more paged state than a set device budget and checks the card never holds
more than the budget (skipped without a GPU).
"""
import io
import warnings

import pytest
import torch

import bnbcy.optim as O
from bnbcy.optim import paged

BIG = (320, 320)          # 102400 elements: paged (bitsandbytes pages from 1e5 on)
SMALL = (50, 40)          # never paged


@pytest.fixture(autouse=True)
def _fresh_manager():
    paged.PageManager.get_instance().initialize()
    yield
    paged.PageManager.get_instance().initialize()


def _params(shapes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def _grads(shapes, steps, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(device) for s in shapes] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


PAIRS = [("PagedAdamW8bit", "AdamW8bit"), ("PagedAdam32bit", "Adam32bit"), ("PagedLion8bit", "Lion8bit"),
         ("PagedAdEMAMix8bit", "AdEMAMix8bit"), ("PagedLion", "Lion")]


@pytest.mark.parametrize("paged_name,plain_name", PAIRS)
def test_cpu_paged_layout_and_numbers_equal_unpaged(paged_name, plain_name):
    shapes = [BIG, SMALL]
    grads = _grads(shapes, 3)
    a, b = _params(shapes), _params(shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # paged on the CPU no longer warns
        pa = getattr(O, paged_name)(a, lr=1e-2)
        _run(pa, a, grads)
    pb = getattr(O, plain_name)(b, lr=1e-2)
    _run(pb, b, grads)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    big, small = pa.state[a[0]], pa.state[a[1]]
    for key, t in pb.state[b[0]].items():
        u = big[key]
        if not isinstance(t, torch.Tensor):
            assert u == t
            continue
        assert u.shape == t.shape and u.dtype == t.dtype and u.device == t.device
        assert torch.equal(u, t), key
        assert getattr(u, "is_paged", False) == (key in ("state1", "state2")), key
    assert big["state1"].page_deviceid == paged.HOST_DEVICE
    assert not any(getattr(v, "is_paged", False) for v in small.values())
    live = paged.PageManager.get_instance().paged_tensors
    want = [big["state1"]] + ([big["state2"]] if "state2" in big else [])
    assert len(live) == len(want) and all(x is y for x, y in zip(live, want))


def test_cpu_state_dict_round_trip_repages():
    shapes = [BIG, SMALL]
    grads = _grads(shapes, 4)
    a, b = _params(shapes), _params(shapes)
    pa = O.PagedAdamW8bit(a)
    _run(pa, a, grads[:2])
    buf = io.BytesIO()
    torch.save(pa.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    inner = sd["state"][0]["__bnb_optimizer_quant_state__"]
    assert inner["state1"].dtype == torch.uint8 and inner["state1"].shape == BIG

    pb = O.PagedAdamW8bit(b)
    with torch.no_grad():
        for x, y in zip(b, a):
            x.copy_(y)
    pb.load_state_dict(sd)
    loaded = pb.state[b[0]]["state1"]
    mgr = paged.PageManager.get_instance()
    assert not mgr.owns(loaded)            # a plain tensor (torch.load keeps the is_paged attribute)
    plain = O.AdamW8bit(_params(shapes))
    plain.load_state_dict(sd)                                          # the format is the unpaged one
    _run(pa, a, grads[2:])
    _run(pb, b, grads[2:])
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    st = pb.state[b[0]]
    assert mgr.owns(st["state1"]) and mgr.owns(st["state2"])                # paged again by the step
    assert torch.equal(st["state1"], pa.state[a[0]]["state1"])
    assert torch.equal(st["absmax2"], pa.state[a[0]]["absmax2"])


def test_cpu_budget_evicts_least_recently_prefetched():
    shapes = [BIG, BIG, BIG]
    per_param = 2 * BIG[0] * BIG[1] * 4                     # state1 + state2, float32
    mgr = paged.PageManager.get_instance()
    mgr.set_budget(2 * per_param, "cpu")
    params = _params(shapes)
    opt = O.PagedAdam32bit(params)
    _run(opt, params, _grads(shapes, 1))
    # A, B fit; C evicts A
    assert mgr.stats["evictions"] == 2 and mgr.stats["evicted_bytes"] == per_param
    assert mgr.resident_bytes("cpu") == 2 * per_param
    _run(opt, params, _grads(shapes, 2))
    # each later step: A evicts B, B evicts C, C evicts A
    assert mgr.stats["evictions"] == 2 + 2 * 6
    assert mgr.resident_bytes("cpu") <= mgr.budget("cpu")
    assert mgr.stats["prefetched_bytes"] == 9 * per_param        # every parameter, every step
    # a budget below one parameter's state prefetches nothing, the step still runs
    mgr.set_budget(per_param // 2, "cpu")
    before = [p.detach().clone() for p in params]
    _run(opt, params, _grads(shapes, 1, seed=9))
    assert mgr.stats["over_budget"] == 3
    assert all(not torch.equal(x, y) for x, y in zip(before, params))
    mgr.set_budget(None, "cpu")
    assert mgr.budget("cpu") is None


def test_paged_tensors_are_released_with_the_optimizer():
    params = _params([BIG])
    opt = O.PagedAdamW32bit(params)
    _run(opt, params, _grads([BIG], 1))
    mgr = paged.PageManager.get_instance()
    assert len(mgr.paged_tensors) == 2
    del opt
    assert mgr.paged_tensors == []


def test_get_paged_and_prefetch_tensor_like_bitsandbytes():
    t = paged.get_paged(3, 5, dtype=torch.float16, device="cpu")
    assert t.is_paged and t.shape == (3, 5) and t.dtype == torch.float16 and not t.any()
    assert paged.get_paged((0,), device="cpu").numel() == 0
    paged.prefetch_tensor(t)
    mgr = paged.PageManager.get_instance()
    assert mgr.resident_bytes("cpu") == 30
    paged.prefetch_tensor(t, to_cpu=True)
    assert mgr.resident_bytes("cpu") == 0 and mgr.stats["evictions"] == 1
    mgr.prefetch_all()
    assert mgr.resident_bytes("cpu") == 30
    with pytest.raises(ValueError, match="only paged tensors"):
        paged.prefetch_tensor(torch.zeros(3))
    with pytest.raises(ValueError, match="non-negative ints"):
        paged.get_paged(-1, device="cpu")
    with pytest.raises(TypeError, match="real torch.dtype"):
        paged.get_paged(2, dtype=torch.complex64, device="cpu")
    with pytest.raises(ValueError, match="non-negative int of bytes"):
        mgr.set_budget(-5, "cpu")
    with pytest.raises(RuntimeError, match="get_instance"):
        paged.PageManager()


def _cuda_ready():
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed"
    return None


@pytest.mark.cuda
@pytest.mark.skipif(_cuda_ready() is not None, reason=f"needs a CUDA GPU and CuPy: {_cuda_ready()}")
def test_cuda_training_beyond_the_device_budget():
    import cupy
    n = 1 << 22                                   # 4M float32 = 16 MiB per state tensor
    shapes = [(n,)] * 6                           # 6 x 2 states x 16 MiB = 192 MiB of paged state
    per_param = 2 * n * 4
    budget = 2 * per_param                        # 64 MiB: a third of the state fits
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * len(shapes) * per_param:       # stay far below the card: never oversubscribe it
        pytest.skip(f"needs a CUDA GPU with {16 * len(shapes) * per_param >> 20} MiB free, has {free >> 20}")
    mgr = paged.PageManager.get_instance()
    mgr.set_budget(budget, "cuda:0")
    a = _params(shapes, device="cuda")
    b = _params(shapes, device="cuda")
    grads = _grads(shapes, 3, device="cuda")
    opt = O.PagedAdamW32bit(a, lr=1e-2)
    ref = O.AdamW32bit(b, lr=1e-2)
    torch.cuda.synchronize()
    free0, reserved0 = torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved()
    peak = 0
    for gs in grads:
        for p, g in zip(a, gs):
            p.grad = g.clone()
        opt.step()
        torch.cuda.synchronize()
        resident = mgr.resident_bytes("cuda:0")
        assert resident <= budget
        # device memory in use beyond torch's own pool: the managed pages on the card
        peak = max(peak, free0 - torch.cuda.mem_get_info()[0] - (torch.cuda.memory_reserved() - reserved0))
    _run(ref, b, grads)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    st = opt.state[a[0]]
    attrs = cupy.cuda.runtime.pointerGetAttributes(st["state1"].data_ptr())
    assert attrs.type == paged._MEMORY_TYPE_MANAGED            # the state is the managed allocation
    assert st["state1"].device.type == "cuda" and st["state1"].is_paged
    assert mgr.stats["evictions"] > 0
    assert peak <= budget + (32 << 20), f"{peak >> 20} MiB of managed pages on the device, budget {budget >> 20}"


def test_emulated_paged_equals_unpaged():
    # under emulation parameters are CPU tensors: the host-backed paged path, whichever kernels
    # the dispatch picks for the update (the emulated CUDA ones once the optimizer is routed there)
    from bnbcy import kernels as K
    shapes = [BIG]
    grads = _grads(shapes, 2)
    a, b = _params(shapes), _params(shapes)
    with K.emulate():
        pa, pb = O.PagedAdamW8bit(a), O.AdamW8bit(b)
        _run(pa, a, grads)
        _run(pb, b, grads)
    assert torch.equal(a[0], b[0])
    assert paged.PageManager.get_instance().owns(pa.state[a[0]]["state1"])
    assert torch.equal(pa.state[a[0]]["state2"], pb.state[b[0]]["state2"])


class _FakeRuntime:
    """Records the CUDA runtime calls of the managed backing (no GPU needed)."""

    def __init__(self, concurrent=1, advise_error=None):
        self.calls, self.concurrent, self.advise_error = [], concurrent, advise_error

    def deviceGetAttribute(self, attr, dev):
        return self.concurrent

    def memAdvise(self, ptr, n, advice, dev):
        if self.advise_error:
            raise self.advise_error
        self.calls.append(("advise", ptr, n, advice, dev))

    def memPrefetchAsync(self, ptr, n, dev, stream):
        self.calls.append(("prefetch", ptr, n, dev, stream))


def _fake_managed(rt):
    b = paged._ManagedBacking.__new__(paged._ManagedBacking)
    b.rt, b._concurrent, b._advice_failed = rt, {}, False
    return b


def test_managed_backing_runtime_calls():
    t = torch.zeros(10, dtype=torch.float32)
    t.page_deviceid = 0
    rt = _FakeRuntime()
    b = _fake_managed(rt)
    b.to_device(t, 0, 77)
    b.to_host(t, 77)
    ptr = t.data_ptr()
    assert rt.calls == [("advise", ptr, 40, paged._ADVISE_UNSET_PREFERRED, 0), ("prefetch", ptr, 40, 0, 77),
                        ("advise", ptr, 40, paged._ADVISE_PREFERRED_LOCATION, paged.HOST_DEVICE),
                        ("prefetch", ptr, 40, paged.HOST_DEVICE, 77)]
    rt = _FakeRuntime(concurrent=0)               # no concurrent managed access: no prefetching
    _fake_managed(rt).to_device(t, 0, 0)
    assert [c[0] for c in rt.calls] == ["advise"]
    rt = _FakeRuntime(advise_error=RuntimeError("cudaErrorInvalidValue"))
    b = _fake_managed(rt)
    with pytest.warns(RuntimeWarning, match="cudaMemAdvise failed"):
        b.to_device(t, 0, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # reported once
        b.to_host(t, 5)
    assert rt.calls == [("prefetch", ptr, 40, 0, 5), ("prefetch", ptr, 40, paged.HOST_DEVICE, 5)]

"""Optimizer update kernels (NUMERICS.md §6.3-§6.6) against an independent float32
NumPy model, torch.optim and bitsandbytes' CPU backend."""
import zlib

import numpy as np
import pytest
import torch

import bnbcy.functional as F
from bnbcy.functional.maps import create_dynamic_map

f32, f64 = np.float32, np.float64
TORCH_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QMAP1 = create_dynamic_map(signed=True).numpy()
QMAP2 = create_dynamic_map(signed=False).numpy()
HP = {  # beta1, beta2, beta3, alpha, eps, lr
    "adam": (0.9, 0.999, 0.0, 0.0, 1e-8, 1e-3),
    "lamb": (0.9, 0.999, 0.0, 0.0, 1e-8, 1e-3),
    "ademamix": (0.9, 0.999, 0.9999, 5.0, 1e-8, 1e-3),
    "momentum": (0.9, 0.0, 0.0, 0.0, 0.0, 1e-2),
    "lars": (0.9, 0.0, 0.0, 0.0, 0.0, 1e-2),
    "rmsprop": (0.99, 0.0, 0.0, 0.0, 1e-8, 1e-2),
    "adagrad": (0.0, 0.0, 0.0, 0.0, 1e-10, 1e-2),
    "lion": (0.9, 0.99, 0.0, 0.0, 0.0, 1e-4),
}
MAX_UNORM = {"lamb": 1.0, "lars": 0.02}
TWO = ("adam", "lamb", "ademamix")


# ------------------------------------------------------------------ model ---

def fma(a, b, c):
    """fma emulated in float64 (exact product; rare double rounding on the sum)."""
    return (np.asarray(a, f64) * np.asarray(b, f64) + np.asarray(c, f64)).astype(f32)


def rnd(x, dt):
    """T(x): round float32 values to the parameter dtype and back."""
    x = np.asarray(x, f32)
    if dt == "float32":
        return x
    return torch.from_numpy(x.copy()).to(TORCH_DT[dt]).float().numpy()


def ftz(x):
    x = np.asarray(x, f32)
    return np.where(np.abs(x) < np.finfo(f32).tiny, np.copysign(f32(0), x), x).astype(f32)


def sgn(x):
    return np.where(x > 0, f32(1), np.where(x < 0, f32(-1), f32(0))).astype(f32)


def scalars(b1, b2, step, lr, eps):
    st = f32(step)
    c1 = f32(1) - f32(b1) ** st
    c2 = np.sqrt(f32(1) - f32(b2) ** st)
    return c1, c2, -(c2 * lr) / c1, c2 * eps


def model_unorm(name, g, s1, s2, d, step):
    """Σ u² of §6.4 (float32 u, float64 sum)."""
    b1, b2, eps = d["b1"], d["b2"], d["eps"]
    if name in ("adam", "lamb"):
        m = fma(s1, b1, (f32(1) - b1) * g)
        v = fma(s2, b2, (f32(1) - b2) * (g * g))
        r1 = f32(1) / (f32(1) - b1 ** f32(step))
        r2 = f32(1) / (f32(1) - b2 ** f32(step))
        u = (m * r1) / (np.sqrt(v * r2) + eps)
    elif name in ("momentum", "lars"):
        u = g if step == 1 else fma(s1, b1, g)
    else:
        return 0.0
    return float(np.sum((u * u).astype(f64)))


def trust(name, unorm, max_unorm, pnorm, eps):
    u = np.sqrt(f32(unorm))
    L = f32(max_unorm) * f32(pnorm) if name in ("adam", "lamb") else fma(f32(max_unorm), f32(pnorm), eps)
    return L / u if u > L else f32(1)


def model32(name, g, p, s1, s2, d, step, dt, skip=False, max_unorm=0.0):
    """One 32-bit update (§6.3) on float32 copies; returns p, s1, s2."""
    b1, b2, b3, alpha, eps, lr, wd, gns = (d[k] for k in ("b1", "b2", "b3", "alpha", "eps", "lr", "wd", "gns"))
    g = rnd(gns * g, dt)
    decay = f32(1) - lr * wd
    c1, c2, ss, c2eps = scalars(b1, b2, step, lr, eps)
    us = f32(1)
    if max_unorm > 0 and name not in ("lion", "ademamix", "adagrad"):
        pnorm = torch.norm(torch.from_numpy(p)).item()  # torch.norm(p.float()), as bnb
        us = trust(name, model_unorm(name, g, s1, s2, d, step), max_unorm, pnorm, eps)
    if name in ("adam", "lamb"):
        keep = skip & (g == 0)
        m = fma(s1, b1, (f32(1) - b1) * g)
        v = fma(s2, b2, (f32(1) - b2) * (g * g))
        pn = rnd(fma(ss * us, m / (np.sqrt(v) + c2eps), p), dt)
        if wd > 0:
            pn = rnd(pn * decay, dt)
        return (np.where(keep, p, pn), np.where(keep, s1, m), np.where(keep, s2, v))
    if name == "ademamix":
        n = p.size
        m1 = fma(s1[:n], b1, (f32(1) - b1) * g)
        m2 = fma(s1[n:], b3, (f32(1) - b3) * g)
        nu = fma(s2, b2, g * ((f32(1) - b2) * g))
        pn = rnd(p - (fma(m2, alpha, m1 / c1) / (np.sqrt(nu) / c2 + eps)) * lr, dt)
        if wd > 0:
            pn = rnd(pn * decay, dt)
        return pn, np.concatenate([m1, m2]), nu
    if wd > 0 and name != "lion":
        g = rnd(fma(p, wd, g), dt)
    keep = skip & (g == 0)
    if name in ("momentum", "lars"):
        s = g if step == 1 else fma(s1, b1, g)
        pn = rnd(p - us * (s * lr), dt)
    elif name == "rmsprop":
        s = fma(s1, b1, g * ((f32(1) - b1) * g))
        pn = rnd(p - us * ((g / (np.sqrt(s) + eps)) * lr), dt)
    elif name == "adagrad":
        s = fma(g, g, s1)
        pn = rnd(p - (g / (np.sqrt(s) + eps)) * lr, dt)
    else:  # lion
        pn = rnd(p * decay, dt) if wd > 0 else p
        dd = fma(s1, b1, (f32(1) - b1) * g)
        pn = rnd(pn - us * (sgn(dd) * lr), dt)
        s = fma(s1, b2, (f32(1) - b2) * g)
    return np.where(keep, p, pn), np.where(keep, s1, s), s2


def requant(s, M, qmap, signed):
    """Nearest code of ftz(s * ftz(1/M)) (ties to the even index), then the sign fix."""
    mids = ((qmap[:-1] + qmap[1:]) * f32(0.5)).astype(f32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        xn = ftz(s * ftz(f32(1) / f32(M)))
    c = np.searchsorted(mids, xn, side="left")
    c = c + ((c < 255) & (mids[np.minimum(c, 254)] == xn) & (c % 2 == 1))
    c = np.where(np.isnan(xn), 0, c)
    if signed:
        bad = np.signbit(qmap[c]) != np.signbit(s)
        c = np.where(bad, np.where(s > 0, (c + 1) % 256, (c - 1) % 256), c)
    return c.astype(np.uint8)


def bmax(s):
    a = np.where(np.isnan(s), -np.finfo(f32).max, np.abs(s))
    return a.max(axis=1).astype(f32)


def model8(name, g, p, q1, q2, a1, a2, d, step, dt, skip=False, max_unorm=0.0):
    """One 8-bit blockwise update (§6.5); returns p, q1, q2, a1, a2."""
    b1, b2, b3, alpha, eps, lr, wd, gns = (d[k] for k in ("b1", "b2", "b3", "alpha", "eps", "lr", "wd", "gns"))
    n = p.size
    nb = -(-n // 256)
    pad = nb * 256 - n
    G = np.concatenate([g, np.zeros(pad, f32)]).reshape(nb, 256)
    P = np.concatenate([p, np.zeros(pad, f32)]).reshape(nb, 256)

    def codes(q, fill):
        return np.concatenate([q, np.full(pad, fill, np.uint8)]).reshape(nb, 256)

    decay = f32(1) - lr * wd
    c1, c2, ss, c2eps = scalars(b1, b2, step, lr, eps)
    D1 = ftz(QMAP1[codes(q1[:n], 128)] * ftz(a1[:nb])[:, None])
    gv = G * gns
    with np.errstate(invalid="ignore", over="ignore"):
        if name in TWO:
            D2 = ftz(QMAP2[codes(q2, 0)] * ftz(a2)[:, None])
            fin = np.isfinite(G)
            S1 = np.where(fin, ftz(fma(f32(1) - b1, gv, ftz(D1 * b1))), f32(0))
            S2 = np.where(fin, ftz(fma(gv, (f32(1) - b2) * gv, ftz(D2 * b2))), f32(0))
            us = f32(1)
            if max_unorm > 0 and name != "ademamix":
                r1 = f32(1) / (f32(1) - b1 ** f32(step))
                r2 = f32(1) / (f32(1) - b2 ** f32(step))
                u = ((S1 * r1) / (np.sqrt(S2 * r2) + eps)).reshape(-1)[:n]
                us = trust(name, np.sum((u * u).astype(f64)), max_unorm, torch.norm(torch.from_numpy(p)).item(), eps)
            if name == "ademamix":
                D3 = ftz(QMAP1[codes(q1[n:], 128)] * ftz(a1[nb:])[:, None])
                S3 = np.where(fin, ftz(fma(f32(1) - b3, gv, ftz(D3 * b3))), f32(0))
                pn = rnd(P - (fma(S3, alpha, S1 / c1) / (np.sqrt(S2) / c2 + eps)) * lr, dt)
            else:
                pn = rnd(fma(ss * us, S1 / (np.sqrt(S2) + c2eps), P), dt)
            if wd > 0:
                pn = rnd(pn * decay, dt)
            pn = np.where(fin, pn, P)
            M1, M2 = bmax(S1), bmax(S2)
            nq1 = requant(S1, M1[:, None], QMAP1, True).reshape(-1)[:n]
            nq2 = requant(S2, M2[:, None], QMAP2, False).reshape(-1)[:n]
            na1 = M1
            if name == "ademamix":
                M3 = bmax(S3)
                nq1 = np.concatenate([nq1, requant(S3, M3[:, None], QMAP1, True).reshape(-1)[:n]])
                na1 = np.concatenate([M1, M3])
            return pn.reshape(-1)[:n], nq1, nq2, na1, M2
        active = ~(skip & (G == 0))
        us = f32(1)
        if max_unorm > 0 and name in ("momentum", "lars"):
            u = (gv if step == 1 else fma(D1, b1, gv)).reshape(-1)[:n]
            us = trust(name, np.sum((u * u).astype(f64)), max_unorm, torch.norm(torch.from_numpy(p)).item(), eps)
        Pd = P
        if wd > 0:
            if name == "lion":
                Pd = rnd(P * decay, dt)
            else:
                gv = fma(P, wd, gv)
        if name in ("momentum", "lars"):
            S = ftz(gv if step == 1 else fma(D1, b1, gv))
            pn = rnd(Pd - us * (S * lr), dt)
        elif name == "rmsprop":
            S = ftz(fma(f32(1) - b1, gv * gv, ftz(D1 * b1)))
            pn = rnd(Pd - us * ((G / (np.sqrt(S) + eps)) * lr), dt)
        elif name == "adagrad":
            S = ftz(fma(gv, gv, D1))
            pn = rnd(Pd - (G / (np.sqrt(S) + eps)) * lr, dt)
        else:
            gs = rnd(sgn(fma(f32(1) - b1, gv, ftz(D1 * b1))) * lr, dt)
            S = ftz(fma(f32(1) - b2, gv, ftz(D1 * b2)))
            pn = np.where(skip & (gs == 0), Pd, rnd(Pd - gs, dt))
        S = np.where(active, S, D1)
        pn = np.where(active, pn, P)
        M1 = bmax(S)
        return pn.reshape(-1)[:n], requant(S, M1[:, None], QMAP1, True).reshape(-1)[:n], None, M1, None


# ---------------------------------------------------------------- helpers ---

def hparams(name, wd=0.0, gns=1.0):
    b1, b2, b3, alpha, eps, lr = HP[name]
    return dict(b1=f32(b1), b2=f32(b2), b3=f32(b3), alpha=f32(alpha), eps=f32(eps), lr=f32(lr), wd=f32(wd),
                gns=f32(gns))


def max_ulps(a, b, dt, ref=None):
    """max |a-b| in units of the dtype's ulp at max(|b|, |ref|) (ref: the value before the
    update, so that cancellation near 0 is not counted in ulps of a tiny result)."""
    a, b = np.asarray(a, f64), np.asarray(b, f64)
    m = np.abs(b) if ref is None else np.maximum(np.abs(b), np.abs(np.asarray(ref, f64)))
    if dt == "float16":
        sp = np.spacing(m.astype(np.float16)).astype(f64)
    else:
        sp = np.spacing(m.astype(f32)).astype(f64) * (65536 if dt == "bfloat16" else 1)
    sp = np.maximum(sp, np.finfo(f32).tiny)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        return float(np.max(np.where(same, 0.0, np.abs(a - b) / sp))) if a.size else 0.0


def make_grad(n, dt, rng, zeros=False):
    g = rng.standard_normal(n).astype(f32)
    if zeros:
        g[rng.random(n) < 0.3] = 0
    return torch.from_numpy(g).to(TORCH_DT[dt])


def call32(name, gs, ps, s1s, s2s, d, step, skip=False, max_unorm=0.0):
    F.optimizer_update_32bit_multi(name, gs, ps, s1s, d["b1"], d["eps"], step, d["lr"], s2s, d["b2"], d["b3"],
                                   d["alpha"], d["wd"], d["gns"], max_unorm=max_unorm, skip_zeros=skip)


def call8(name, gs, ps, s1s, s2s, a1s, a2s, d, step, skip=False, max_unorm=0.0):
    two = name in TWO
    F.optimizer_update_8bit_blockwise_multi(
        name, gs, ps, s1s, s2s if two else None, d["b1"], d["b2"], d["b3"], d["alpha"], d["eps"], step, d["lr"],
        torch.from_numpy(QMAP1), torch.from_numpy(QMAP2) if two else None, a1s, a2s if two else None,
        weight_decay=d["wd"], gnorm_scale=d["gns"], skip_zeros=skip, max_unorm=max_unorm)


SIZES = (1, 255, 257, 4097)


# ---------------------------------------------------------------- 32-bit ---

@pytest.mark.parametrize("dt", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(HP))
def test_32bit_matches_model(name, dt):
    rng = np.random.default_rng(zlib.crc32(f"{name}{dt}".encode()))
    for wd, skip, gns in ((0.0, False, 1.0), (0.1, True, 0.5)):
        d = hparams(name, wd, gns)
        mu = MAX_UNORM.get(name, 0.0)
        ps = [torch.from_numpy(rng.standard_normal(n).astype(f32)).to(TORCH_DT[dt]) for n in SIZES]
        k1 = 2 if name == "ademamix" else 1
        s1s = [torch.zeros(k1 * n).reshape(-1, n) if k1 == 2 else torch.zeros(n) for n in SIZES]
        s2s = [torch.zeros(n) if name in TWO else None for n in SIZES]
        mp = [p.float().numpy().copy() for p in ps]
        m1 = [s.numpy().reshape(-1).copy() for s in s1s]
        p_old = [x.copy() for x in mp]
        m2 = [s.numpy().copy() if s is not None else None for s in s2s]
        for step in (1, 2, 3):
            gs = [make_grad(n, dt, rng, zeros=skip) for n in SIZES]
            call32(name, gs, ps, s1s, s2s, d, step, skip=skip, max_unorm=mu)
            for k in range(len(SIZES)):
                mp[k], m1[k], m2[k] = model32(name, gs[k].float().numpy(), mp[k], m1[k], m2[k], d, step, dt,
                                              skip=skip, max_unorm=mu)
                assert max_ulps(ps[k].float().numpy(), mp[k], dt, p_old[k]) <= 2, (k, step)
                assert max_ulps(s1s[k].numpy().reshape(-1), m1[k], "float32") <= 2, (k, step)
                if m2[k] is not None:
                    assert max_ulps(s2s[k].numpy(), m2[k], "float32") <= 2, (k, step)
                # tie the states back to the kernel's so the model does not drift
                mp[k], m1[k] = ps[k].float().numpy().copy(), s1s[k].numpy().reshape(-1).copy()
                p_old[k] = mp[k].copy()
                if m2[k] is not None:
                    m2[k] = s2s[k].numpy().copy()


def test_32bit_skip_zeros_and_unorm_vec():
    n = 1000
    p = torch.randn(n)
    g = torch.randn(n)
    g[::3] = 0
    s1, s2 = torch.zeros(n), torch.zeros(n)
    p0 = p.clone()
    F.optimizer_update_32bit("adam", g, p, s1, 0.9, 1e-8, 1, 1e-3, s2, 0.999, skip_zeros=True)
    assert torch.equal(p[::3], p0[::3]) and torch.all(s1[::3] == 0) and not torch.equal(p[1::3], p0[1::3])
    uv = torch.zeros(1)
    F.optimizer_update_32bit("lamb", g, p, s1, 0.9, 1e-8, 2, 1e-3, s2, 0.999, unorm_vec=uv, max_unorm=1.0)
    assert uv.item() > 0


# ----------------------------------------------------------------- 8-bit ---

def init8(name, n, rng):
    """A non-trivial 8-bit state: quantize random moments with the kernel's own layout."""
    k1 = 2 if name == "ademamix" else 1
    nb = -(-n // 256)
    q1 = torch.from_numpy(rng.integers(0, 256, k1 * n).astype(np.uint8))
    a1 = torch.from_numpy((rng.random(k1 * nb) * 0.1).astype(f32))
    if name in ("rmsprop", "adagrad"):
        q1 = torch.from_numpy(rng.integers(128, 256, n).astype(np.uint8))
    q2 = torch.from_numpy(rng.integers(1, 256, n).astype(np.uint8)) if name in TWO else None
    a2 = torch.from_numpy((rng.random(nb) * 0.01).astype(f32)) if name in TWO else None
    if name == "ademamix":
        q1 = q1.reshape(2, n)
        a1 = a1.reshape(2, nb)
    return q1, q2, a1, a2


@pytest.mark.parametrize("dt", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(HP))
def test_8bit_matches_model(name, dt):
    rng = np.random.default_rng(zlib.crc32(f"{name}{dt}8".encode()))
    for wd, skip in ((0.0, False), (0.1, True)):
        d = hparams(name, wd)
        mu = MAX_UNORM.get(name, 0.0)
        ps = [torch.from_numpy(rng.standard_normal(n).astype(f32)).to(TORCH_DT[dt]) for n in SIZES]
        st = [init8(name, n, rng) for n in SIZES]
        q1s, q2s, a1s, a2s = ([s[i] for s in st] for i in range(4))
        for step in (1, 2, 3):
            gs = [make_grad(n, dt, rng, zeros=skip) for n in SIZES]
            if name in TWO and step == 2:
                for g in gs:
                    g[::7] = float("nan")
                    g[3::11] = float("inf")
            before = [(p.float().numpy().copy(), q1.numpy().reshape(-1).copy(),
                       None if q2 is None else q2.numpy().copy(), a1.numpy().reshape(-1).copy(),
                       None if a2 is None else a2.numpy().copy()) for p, q1, q2, a1, a2 in zip(ps, q1s, q2s, a1s, a2s)]
            call8(name, gs, ps, q1s, q2s, a1s, a2s, d, step, skip=skip, max_unorm=mu)
            for k in range(len(SIZES)):
                p0, c1, c2, b1, b2 = before[k]
                mp, mq1, mq2, ma1, ma2 = model8(name, gs[k].float().numpy(), p0, c1, c2, b1, b2, d, step, dt,
                                                skip=skip, max_unorm=mu)
                np.testing.assert_array_equal(a1s[k].numpy().reshape(-1), ma1)
                np.testing.assert_array_equal(q1s[k].numpy().reshape(-1), mq1)
                if mq2 is not None:
                    np.testing.assert_array_equal(a2s[k].numpy(), ma2)
                    np.testing.assert_array_equal(q2s[k].numpy(), mq2)
                assert max_ulps(ps[k].float().numpy(), mp, dt, p0) <= 2, (k, step)


def test_8bit_nan_gradient_resets_two_state():
    n = 512
    p = torch.randn(n)
    q1 = torch.full((n,), 200, dtype=torch.uint8)
    q2 = torch.full((n,), 200, dtype=torch.uint8)
    a1, a2 = torch.ones(2), torch.ones(2)
    g = torch.randn(n)
    g[5] = float("nan")
    g[300] = float("-inf")
    p0 = p.clone()
    F.optimizer_update_8bit_blockwise("adam", g, p, q1, q2, 0.9, 0.999, 0.0, 0.0, 1e-8, 3, 1e-3,
                                      torch.from_numpy(QMAP1), torch.from_numpy(QMAP2), a1, a2)
    assert p[5] == p0[5] and p[300] == p0[300]
    assert QMAP1[q1[5]] * a1[0] == 0 and QMAP1[q1[300]] * a1[1] == 0
    assert q2[5] == 0 and q2[300] == 0


def test_8bit_skip_zeros_keeps_old_state():
    n = 300
    rng = np.random.default_rng(1)
    q1, _, a1, _ = init8("momentum", n, rng)
    g = torch.randn(n)
    g[:256] = 0  # whole first block skipped: its state and absmax do not change
    q0, a0 = q1.clone(), a1.clone()
    p = torch.randn(n)
    F.optimizer_update_8bit_blockwise("momentum", g, p, q1, None, 0.9, 0.0, 0.0, 0.0, 0.0, 2, 1e-2,
                                      torch.from_numpy(QMAP1), None, a1, None, skip_zeros=True)
    old = QMAP1[q0[:256].numpy()] * a0[0].item()
    new = QMAP1[q1[:256].numpy()] * a1[0].item()
    np.testing.assert_allclose(new, old, rtol=0, atol=a0[0].item() * 0.02)
    assert a1[0] == np.abs(old).max().astype(f32)


def test_8bit_zero_state_block_is_code_255():
    n = 256
    q1 = torch.full((n,), 127, dtype=torch.uint8)
    a1 = torch.zeros(1)
    p = torch.randn(n)
    F.optimizer_update_8bit_blockwise("momentum", torch.zeros(n), p, q1, None, 0.9, 0.0, 0.0, 0.0, 0.0, 2, 1e-2,
                                      torch.from_numpy(QMAP1), None, a1, None)
    assert torch.all(q1 == 255) and a1.item() == 0


# ------------------------------------------------------ multi vs single ---

@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name", ["adam", "ademamix", "lamb", "lion", "rmsprop"])
def test_multi_equals_single(name, bits):
    rng = np.random.default_rng(7)
    sizes = (70000, 300, 40001, 1)
    d = hparams(name, 0.01)
    mu = MAX_UNORM.get(name, 0.0)
    ps = [torch.from_numpy(rng.standard_normal(n).astype(f32)) for n in sizes]
    gs = [torch.from_numpy(rng.standard_normal(n).astype(f32)) for n in sizes]
    if bits == 32:
        k1 = 2 if name == "ademamix" else 1
        st = [(torch.from_numpy(rng.random(k1 * n).astype(f32)).reshape(k1, n).squeeze(0),
               torch.from_numpy(rng.random(n).astype(f32)) if name in TWO else None) for n in sizes]
    else:
        st = [init8(name, n, rng) for n in sizes]
    clone = lambda x: None if x is None else x.clone()  # noqa: E731
    ps2 = [p.clone() for p in ps]
    st2 = [tuple(clone(x) for x in s) for s in st]
    steps = [3, 1, 7, 2]
    if bits == 32:
        call32(name, gs, ps, [s[0] for s in st], [s[1] for s in st], d, steps, max_unorm=mu)
        for k in range(len(sizes)):
            call32(name, [gs[k]], [ps2[k]], [st2[k][0]], [st2[k][1]], d, steps[k], max_unorm=mu)
    else:
        call8(name, gs, ps, *[[s[i] for s in st] for i in range(4)], d, steps, max_unorm=mu)
        for k in range(len(sizes)):
            call8(name, [gs[k]], [ps2[k]], *[[st2[k][i]] for i in range(4)], d, steps[k], max_unorm=mu)
    for k in range(len(sizes)):
        assert torch.equal(ps[k], ps2[k])
        for a, b in zip(st[k], st2[k]):
            assert a is None or torch.equal(a, b)


@pytest.mark.parametrize("bits", [32, 8])
def test_scalar_path_equals_simd(bits, monkeypatch):
    rng = np.random.default_rng(3)
    for name in ("adam", "momentum", "lion", "ademamix", "lamb", "lars", "rmsprop", "adagrad"):
        for dt in ("float32", "bfloat16"):
            d = hparams(name, 0.1)
            n = 5000
            p = torch.from_numpy(rng.standard_normal(n).astype(f32)).to(TORCH_DT[dt])
            g = make_grad(n, dt, rng, zeros=True)
            if bits == 32:
                k1 = 2 if name == "ademamix" else 1
                st = (torch.from_numpy(rng.random(k1 * n).astype(f32)).reshape(k1, n).squeeze(0),
                      torch.from_numpy(rng.random(n).astype(f32)) if name in TWO else None)
            else:
                st = init8(name, n, rng)
            res = []
            for isa in ("", "scalar"):
                monkeypatch.setenv("BNBCY_CPU_ISA", isa)
                pp = p.clone()
                ss = [None if x is None else x.clone() for x in st]
                # a small max_unorm, so that the trust ratio acts (also for rmsprop/adagrad)
                mu = 1e-3 if name in ("lamb", "lars", "rmsprop", "adagrad") else 0.0
                if bits == 32:
                    call32(name, [g], [pp], [ss[0]], [ss[1]], d, 2, skip=True, max_unorm=mu)
                else:
                    call8(name, [g], [pp], *[[x] for x in ss], d, 2, skip=True, max_unorm=mu)
                res.append([pp] + ss)
            for a, b in zip(*res):
                assert a is None or torch.equal(a, b), (name, dt)
    if bits == 8:
        _scalar_equals_simd_8bit_1state(rng, monkeypatch)


def _scalar_equals_simd_8bit_1state(rng, monkeypatch):
    """The AVX-512 full-block path of the 8-bit 1-state optimizers against the scalar path, bit for
    bit: weight decay, skip_zeros, max_unorm (lars), step 1, NaN gradients, fp16/bf16, partial
    last blocks and a subnormal regime (flushed dequantized states, products and new states)."""
    for name in ("momentum", "lars", "rmsprop", "adagrad", "lion"):
        for dt in ("float32", "float16", "bfloat16"):
            for wd, skip, n, step, sub in ((0.0, False, 4096, 2, False), (0.1, True, 5000, 2, False),
                                           (0.1, False, 1000, 1, False), (0.0, True, 2304 + 77, 3, True),
                                           (0.1, True, 1536, 1, True)):
                d = hparams(name, wd, 0.5 if step == 3 else 1.0)
                p = torch.from_numpy(rng.standard_normal(n).astype(f32)).to(TORCH_DT[dt])
                g = make_grad(n, dt, rng, zeros=True)
                q1, _, a1, _ = init8(name, n, rng)
                if sub:  # dequantized states (and their products with beta) are subnormal
                    a1 = a1 * f32(1e-36)
                    a1[::3] = 0.0
                    if dt != "float16":
                        # |g|^2 (rmsprop, adagrad) or |g| (momentum, lion) near the subnormal range
                        scale = f32(1e-19) if name in ("rmsprop", "adagrad") else f32(3e-38)
                        g = (g.float() * scale).to(TORCH_DT[dt])
                elif skip:  # (a NaN gradient also turns the lars trust ratio off)
                    g[5::97] = float("nan")
                    g[7::101] = float("inf")
                res = []
                for isa in ("", "scalar"):
                    monkeypatch.setenv("BNBCY_CPU_ISA", isa)
                    pp, qq, aa = p.clone(), q1.clone(), a1.clone()
                    call8(name, [g], [pp], [qq], None, [aa], None, d, step, skip=skip,
                          max_unorm=MAX_UNORM.get(name, 0.0))
                    res.append((pp, qq, aa))
                for a, b in zip(*res):
                    assert torch.equal(a.view(torch.uint8) if a.dtype != torch.uint8 else a,
                                       b.view(torch.uint8) if b.dtype != torch.uint8 else b), \
                        (name, dt, wd, skip, n, step, sub)


# ------------------------------------------------------------ references ---

def test_against_torch_optim():
    torch.manual_seed(0)
    n = 3000
    cases = [
        ("adam", lambda w: torch.optim.AdamW([w], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
         dict(beta1=0.9, beta2=0.999, eps=1e-8, lr=1e-3, weight_decay=0.01)),
        ("momentum", lambda w: torch.optim.SGD([w], lr=1e-2, momentum=0.9, weight_decay=0.01),
         dict(beta1=0.9, eps=0.0, lr=1e-2, weight_decay=0.01)),
        ("rmsprop", lambda w: torch.optim.RMSprop([w], lr=1e-2, alpha=0.99, eps=1e-8),
         dict(beta1=0.99, eps=1e-8, lr=1e-2)),
        ("adagrad", lambda w: torch.optim.Adagrad([w], lr=1e-2, eps=1e-10),
         dict(beta1=0.0, eps=1e-10, lr=1e-2)),
    ]
    for name, make, kw in cases:
        w = torch.randn(n, requires_grad=True)
        p = w.detach().clone()
        opt = make(w)
        s1 = torch.zeros(n)
        s2 = torch.zeros(n) if name == "adam" else None
        for step in range(1, 21):
            g = torch.randn(n)
            w.grad = g.clone()
            opt.step()
            F.optimizer_update_32bit(name, g, p, s1, kw["beta1"], kw["eps"], step, kw["lr"], s2,
                                     kw.get("beta2", 0.0), weight_decay=kw.get("weight_decay", 0.0))
        torch.testing.assert_close(p, w.detach(), rtol=2e-5, atol=2e-6, msg=name)


def test_against_bitsandbytes_cpu():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(1)
    n = 5000
    for name in ("adam", "momentum", "rmsprop", "adagrad", "lion"):
        b1, b2, _, _, eps, lr = HP[name]
        for wd in ((0.0,) if name == "adam" else (0.0, 0.1)):  # bnb CPU decays adam before the step
            p = torch.randn(n)
            q = p.clone()
            s1, t1 = torch.zeros(n), torch.zeros(n)
            s2, t2 = (torch.zeros(n), torch.zeros(n)) if name == "adam" else (None, None)
            for step in range(1, 6):
                g = torch.randn(n)
                F.optimizer_update_32bit(name, g, p, s1, b1, eps, step, lr, s2, b2, weight_decay=wd)
                bnb_f.optimizer_update_32bit(name, g, q, t1, b1, eps, step, lr, t2, b2, weight_decay=wd)
            # state2: bnb's CPU backend forms 1 - beta2 in float64 (1e-3) where the CUDA kernel (and
            # bnbcy) computes 1.0f - beta2 in float32 (0.99998713e-3): a 1.3e-5 relative difference
            for a, b, tol in ((p, q, 1e-6), (s1, t1, 1e-6), (s2, t2, 2e-5)):
                if a is not None:
                    assert ((a - b).norm() / b.norm()).item() <= tol, name


# ---------------------------------------------------------------- errors ---

def test_errors():
    p, g, s = torch.zeros(10), torch.zeros(10), torch.zeros(10)
    with pytest.raises(ValueError, match="Unsupported optimizer"):
        F.optimizer_update_32bit("sgd", g, p, s, 0.9, 0.0, 1, 0.1)
    with pytest.raises(ValueError, match="dtype"):
        F.optimizer_update_32bit("momentum", g.half(), p, s, 0.9, 0.0, 1, 0.1)
    with pytest.raises(ValueError, match="state1"):
        F.optimizer_update_32bit("momentum", g, p, torch.zeros(11), 0.9, 0.0, 1, 0.1)
    with pytest.raises(ValueError, match="state1"):
        F.optimizer_update_32bit("momentum", g, p, torch.zeros(10, dtype=torch.float64), 0.9, 0.0, 1, 0.1)
    with pytest.raises(ValueError, match="state2"):
        F.optimizer_update_32bit("adam", g, p, s, 0.9, 0.0, 1, 0.1)
    with pytest.raises(ValueError, match="shape"):
        F.optimizer_update_32bit("ademamix", g, p, torch.zeros(20), 0.9, 0.0, 1, 0.1, state2=s.clone())
    with pytest.raises(ValueError, match="entries"):
        F.optimizer_update_32bit_multi("momentum", [g], [p, p], [s], 0.9, 0.0, 1, 0.1)
    with pytest.raises(ValueError, match="step"):
        F.optimizer_update_32bit("momentum", g, p, s, 0.9, 0.0, 0, 0.1)
    q = torch.zeros(10, dtype=torch.uint8)
    qm = torch.from_numpy(QMAP1)
    with pytest.raises(ValueError, match="absmax1"):
        F.optimizer_update_8bit_blockwise("momentum", g, p, q, None, 0.9, 0, 0, 0, 0, 1, 0.1, qm, None,
                                          torch.zeros(2), None)
    with pytest.raises(ValueError, match="state1"):
        F.optimizer_update_8bit_blockwise("momentum", g, p, s, None, 0.9, 0, 0, 0, 0, 1, 0.1, qm, None,
                                          torch.zeros(1), None)
    with pytest.raises(ValueError, match="state2"):
        F.optimizer_update_8bit_blockwise("adam", g, p, q, None, 0.9, 0, 0, 0, 0, 1, 0.1, qm, qm,
                                          torch.zeros(1), torch.zeros(1))
    import bnbcy._C as C
    with pytest.raises(ValueError, match="Unsupported"):
        C.cpu_optimizer_update_32bit("nope", [], [], [], [], 0, 0, 0, 0, 0, 0, 0, [], 1, 0, None, False)


def test_percentile_clipping():
    vec = torch.zeros(100)
    g = torch.full((4,), 2.0)
    cur, clip, scale = F.percentile_clipping(g, vec, 1)
    assert torch.all(vec == 16) and cur.item() == 4 and scale == 1.0
    for step in range(2, 30):
        F.percentile_clipping(torch.full((4,), 0.5), vec, step)
    cur, clip, scale = F.percentile_clipping(torch.full((4,), 10.0), vec, 30)
    assert cur.item() == 20 and clip.item() == 1.0 and abs(float(scale) - 0.05) < 1e-7


@pytest.mark.parametrize("name", ["adam", "ademamix"])
def test_8bit_2state_subnormal_regime_simd_equals_scalar(name, monkeypatch):
    # absmax so small that dequantized states and their products with beta are subnormal:
    # the AVX-512 path must flush exactly where the scalar path does
    rng = np.random.default_rng(11)
    n = 4096
    d = hparams(name, 0.1)
    p = torch.from_numpy(rng.standard_normal(n).astype(f32))
    g = torch.from_numpy((rng.standard_normal(n) * 1e-22).astype(f32))
    g[::97] = float("nan")
    q1, q2, a1, a2 = init8(name, n, rng)
    a1 = a1 * 1e-32
    a2 = a2 * 1e-31
    res = []
    for isa in ("", "scalar"):
        monkeypatch.setenv("BNBCY_CPU_ISA", isa)
        st = [q1.clone(), q2.clone(), a1.clone(), a2.clone()]
        pp = p.clone()
        call8(name, [g], [pp], [st[0]], [st[1]], [st[2]], [st[3]], d, 3)
        res.append([pp] + st)
    for x, y in zip(*res):
        assert torch.equal(x, y)


# ------------------------------------------------- AVX-512 requantization ---

def _requant_probes(code):
    """Values that stress a code search: every midpoint and its float neighbours (ties and
    near-ties), the map's values, signed zeros, subnormals, 1 and its neighbours, random bit
    patterns over the whole float range and typical normalized states."""
    code = code.astype(f32)
    mids = ((code[:-1] + code[1:]) * f32(0.5)).astype(f32)
    up, down = np.nextafter(mids, f32(np.inf)), np.nextafter(mids, f32(-np.inf))
    tiny = np.finfo(f32).tiny
    special = np.array([0.0, 1e-45, tiny, np.nextafter(tiny, f32(0)), np.nextafter(tiny, f32(1)), 1e-30,
                        1.0, np.nextafter(f32(1), f32(2)), np.nextafter(f32(1), f32(0)), 3.0e38], f32)
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32).view(f32)
    pos = np.concatenate([mids, up, down, code, special, np.abs(rng.standard_normal(200_000) * 0.1).astype(f32),
                          rng.random(200_000).astype(f32) ** 8])
    return np.ascontiguousarray(np.concatenate([pos, -pos, bits[np.isfinite(bits)]]).astype(f32))


@pytest.mark.parametrize("sign_fix", [True, False])
@pytest.mark.parametrize("kind", ["dynamic-signed", "dynamic-unsigned", "linear", "dynamic-4bit-exp", "dense"])
def test_requant_table_equals_search(kind, sign_fix):
    # the table read by the AVX-512 8-bit update against the general search + sign fix (§6.5)
    from bnbcy import _C
    from bnbcy.functional.maps import create_linear_map

    code = {"dynamic-signed": QMAP1, "dynamic-unsigned": QMAP2,
            "linear": create_linear_map(signed=True).numpy(),
            "dynamic-4bit-exp": create_dynamic_map(signed=True, max_exponent_bits=4).numpy(),
            # two midpoints share a bucket: no table, the general path
            "dense": np.linspace(0.5, 0.5 + 255 * 2e-6, 256)}[kind]
    code = np.ascontiguousarray(code, dtype=f32)
    x = _requant_probes(code)
    via_table = np.full(x.size, 0xAB, np.uint8)
    ref = np.full(x.size, 0xCD, np.uint8)
    has = _C.opt_requant_codes(_C.view(code, "code"), sign_fix, _C.view(x, "x"), _C.view(via_table, "t"),
                               _C.view(ref, "r"))
    if kind in ("dynamic-signed", "dynamic-unsigned"):
        assert has, "the default dynamic maps must get a requantization table"
    if kind == "dense":
        assert not has
    if has:
        bad = np.flatnonzero(via_table != ref)
        assert bad.size == 0, (x[bad[:5]], via_table[bad[:5]], ref[bad[:5]])
    else:
        assert np.all(via_table == 0xAB) and np.all(ref == 0xCD)


def test_8bit_adam_requant_edges_simd_equals_scalar(monkeypatch):
    """With beta1 = beta2 = 0 the new states are g and g² and a block holding 1.0 has absmax 1, so
    the normalized states are chosen exactly: midpoints, their neighbours, signed zeros, values that
    underflow, blocks whose absmax is inf (g² overflows) or above 2^126, NaN gradients. The AVX-512
    table path against the scalar search, bit for bit."""
    q1v = QMAP1.astype(f32)
    mids1 = ((q1v[:-1] + q1v[1:]) * f32(0.5)).astype(f32)
    mids2 = ((QMAP2[:-1].astype(f32) + QMAP2[1:].astype(f32)) * f32(0.5)).astype(f32)
    rng = np.random.default_rng(9)
    blocks = [
        np.concatenate([[1.0], mids1]),
        np.concatenate([[-1.0], np.nextafter(mids1, f32(np.inf))]),
        np.concatenate([[1.0], np.nextafter(mids1, f32(-np.inf))]),
        np.concatenate([[1.0], np.sqrt(mids2)]),
        np.resize(np.array([1.0, -0.0, 0.0, 1e-39, -1e-39, 1.2e-38, -1.2e-38, 1e-30], f32), 256),
        np.resize(np.array([1e30, 1e-10, -1e-10, -1e-20, 5e-9, 0.0, -0.0], f32), 256),  # g² = inf: M2 = inf
        np.resize(np.array([1e38, -3e37, 1.0, -1e-3, 0.0], f32), 256),  # M1 > 2^126: 1/M1 flushes to 0
        rng.standard_normal(256) * 1e-3,
        np.where(rng.random(256) < 0.1, np.nan, rng.standard_normal(256)),
    ]
    g = torch.from_numpy(np.concatenate([np.resize(b, 256) for b in blocks]).astype(f32))
    n, nb = g.numel(), g.numel() // 256
    d = hparams("adam", 0.0)
    d["b1"] = d["b2"] = f32(0.0)
    q1 = torch.from_numpy(rng.integers(0, 256, n).astype(np.uint8))
    q1[4 * 256:5 * 256] = 0  # negative old states: d1·beta1 = -0, so a -0 gradient gives s1 = -0
    q2 = torch.from_numpy(rng.integers(0, 256, n).astype(np.uint8))
    a1 = torch.from_numpy(rng.random(nb).astype(f32))
    a2 = torch.from_numpy(rng.random(nb).astype(f32))
    p = torch.from_numpy(rng.standard_normal(n).astype(f32))
    res = []
    for isa in ("", "scalar"):
        monkeypatch.setenv("BNBCY_CPU_ISA", isa)
        st = [q1.clone(), q2.clone(), a1.clone(), a2.clone()]
        pp = p.clone()
        call8("adam", [g], [pp], [st[0]], [st[1]], [st[2]], [st[3]], d, 2)
        res.append([pp] + st)
    for x, y in zip(*res):
        assert torch.equal(x.view(torch.uint8) if x.dtype != torch.uint8 else x,
                           y.view(torch.uint8) if y.dtype != torch.uint8 else y)
    a1_new, a2_new = res[0][3], res[0][4]
    assert a2_new[5] == float("inf") and a1_new[6] > 2.0**126  # the blocks that leave the table path

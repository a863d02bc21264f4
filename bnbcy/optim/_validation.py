"""The one validation layer of the optimizer updates.

Both entries validate here, once, before anything is written:

* the functional updates (``optimizer_update_32bit`` / ``optimizer_update_8bit_blockwise``, their
  ``*_multi`` forms, the ``torch.ops.bnbcy`` optimizer ops and the CUDA launchers' public
  functions) call :func:`update_32bit` / :func:`update_8bit`, which check the arrays and scalars
  and return an :class:`Update`: the validated views, step counts and :class:`Hyper` record;
* the optimizer classes' ``step()`` checks every group with :func:`check_param`,
  :func:`check_config` and :func:`check_state` (torch-level: the exception types of torch.optim),
  makes the views of the tensors it checked and refuses aliasing with :func:`check_views`, then
  builds each kernel call's :class:`Update` with :func:`checked_update` (no second check).

The layers below (``optim_update``'s dispatch, ``_optim_cuda``'s launchers, the Cython kernels)
take an :class:`Update` and do not check again; the Cython boundary keeps only the size and dtype
guards that stop a caller that bypasses this layer from writing out of bounds.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .. import _C, _arrays, backends
from . import _table

BLOCKSIZE = 256                       # 8-bit blockwise state: one absmax per 256 elements
GNORM_HISTORY = 100                   # percentile_clipping keeps the last 100 squared norms
MAX_STEP = 2**31 - 1                  # the kernels take the step as an int32
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICE_TYPES = ("cpu", "cuda")        # where the optimizer kernels run
FLOAT_DTYPES = _arrays.FLOAT_DTYPES


@dataclasses.dataclass(frozen=True, init=False)
class Hyper:
    """The hyper-parameters of one update step (hashable: parameters with equal records share a
    kernel call)."""
    lr: float
    beta1: float
    beta2: float = 0.0
    beta3: float = 0.0
    alpha: float = 0.0
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_unorm: float = 0.0
    skip_zeros: bool = False

    # Written out instead of the frozen dataclass's (one object.__setattr__ per field): every
    # functional update makes one. The hash is taken once, here: the step hashes one record per
    # parameter (its kernel-call key).
    def __init__(self, lr, beta1, beta2=0.0, beta3=0.0, alpha=0.0, eps=1e-8, weight_decay=0.0, max_unorm=0.0,
                 skip_zeros=False):
        d = self.__dict__
        d["lr"], d["beta1"], d["beta2"], d["beta3"], d["alpha"] = lr, beta1, beta2, beta3, alpha
        d["eps"], d["weight_decay"], d["max_unorm"], d["skip_zeros"] = eps, weight_decay, max_unorm, skip_zeros
        d["_hash"] = hash((lr, beta1, beta2, beta3, alpha, eps, weight_decay, max_unorm, skip_zeros))

    def __hash__(self):
        return self._hash


@dataclasses.dataclass(eq=False)
class Update:
    """One validated kernel call: what the dispatch and the kernels trust.

    ``ps``/``gs``/``unorm_vecs`` are the caller's arrays (the CUDA path allocates alongside them);
    ``p``, ``g``, ``s1``, ``s2``, ``a1``, ``a2`` their views (``s2``/``a2`` entries None where the
    optimizer keeps one state; ``a1``/``a2``/``q1``/``q2`` only for 8-bit states); ``groups`` the
    indices per dtype (one kernel call each).
    """
    kernel: _table.Kernel
    eight: bool
    ps: list
    gs: list
    p: list
    g: list
    s1: list
    s2: list
    a1: list
    a2: list
    q1: object
    q2: object
    unorm_vecs: list
    steps: list
    param_norms: object
    hyper: Hyper
    gnorm_scale: float
    groups: dict
    cuda: bool

    @property
    def name(self):
        return self.kernel.name

    @property
    def two(self):
        return self.kernel.states == 2


# ------------------------------------------------------------------------ scalars and lists
def real(x, name):
    """``x`` as a float; a 1-element tensor is read (``ValueError`` for anything else)."""
    if type(x) is float or type(x) is int:     # the common case, without the ABC check (not bool)
        return float(x)
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {x!r}")
    return float(x)


def steps(values, count):
    """Step counts: one int for all, or a list of ``count``; each an int in [1, 2**31 - 1]."""
    if isinstance(values, (list, tuple)):
        if len(values) != count:
            raise ValueError(f"steps has {len(values)} entries but there are {count} params")
        out = list(values)
    else:
        out = [values] * count
    res = []
    for s in out:
        if type(s) is int and 1 <= s <= MAX_STEP:
            res.append(s)
            continue
        if isinstance(s, torch.Tensor):
            s = s.item()
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 1 <= s <= MAX_STEP:
            raise ValueError(f"step must be a positive int of at most {MAX_STEP} (the kernels' int32), got {s!r}")
        res.append(int(s))
    return res


def as_list(x, count, name):
    """``x`` as a list of ``count`` entries (None: all None)."""
    if x is None:
        return [None] * count
    x = list(x)
    if len(x) != count:
        raise ValueError(f"{name} has {len(x)} entries but there are {count} params")
    return x


def _hyper(beta1, beta2, beta3, alpha, eps, weight_decay, lr, max_unorm, skip_zeros):
    return Hyper(lr=real(lr, "lr"), beta1=real(beta1, "beta1"), beta2=real(beta2, "beta2"),
                 beta3=real(beta3, "beta3"), alpha=real(alpha, "alpha"), eps=real(eps, "eps"),
                 weight_decay=real(weight_decay, "weight_decay"), max_unorm=max_unorm,
                 skip_zeros=bool(skip_zeros))


def check_not_capturing(cuda):
    """Refuse a CUDA update while the current stream is being captured into a CUDA graph: a
    replay would rerun the captured step count and hyper-parameters (docs/optim.md)."""
    # torch without CUDA (and the SIMT emulator, which runs on it) cannot capture
    if cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("bnbcy's optimizer updates cannot be captured into a CUDA graph: a replay would "
                           "reuse the captured step count and hyper-parameters (lr, AdEMAMix schedules); "
                           "run the optimizer step outside the captured region")


# ------------------------------------------------------------------------ array checks
def _inplace_view(x, name, dtypes, allow_empty=True):
    """View of an array the kernel updates in place: it must already be contiguous and writable
    (a zero-size parameter and its states are a no-op, as in torch.optim)."""
    if x is None or not hasattr(x, "__dlpack__"):
        raise TypeError(f"{name} must be a torch.Tensor, cupy.ndarray or numpy.ndarray, got {type(x).__name__}")
    v = _arrays.input_view(x, name, dtypes, allow_empty=allow_empty, make_contiguous=False)
    if v.readonly:
        raise ValueError(f"{name} must be writable")
    return v


def _required(x, what):
    if x is None:
        raise ValueError(f"{what} is required")
    return x


def _sized(v, name, numel, shape=None):
    if v.numel != numel or (shape is not None and tuple(v.shape) != tuple(shape)):
        want = f"shape {tuple(shape)}" if shape is not None else f"{numel} elements"
        raise ValueError(f"{name} must have {want}, got shape {tuple(v.shape)}")
    return v


def _params(ps, gs):
    """Views of the parameters and gradients and their indices per dtype."""
    pv, gv, groups = [], [], {}
    one = len(ps) == 1
    for k, (p, g) in enumerate(zip(ps, gs)):
        v = _inplace_view(p, "p" if one else f"p[{k}]", FLOAT_DTYPES)
        w = _arrays.input_view(g, "g" if one else f"g[{k}]", FLOAT_DTYPES, allow_empty=True)
        if w.dtype != v.dtype:
            raise ValueError(f"g must have the dtype of p ({v.dtype}), got {w.dtype}")
        if w.numel != v.numel:
            raise ValueError(f"g must have the {v.numel} elements of p, got {w.numel}")
        pv.append(v)
        gv.append(w)
        if v.numel:                                   # nothing to run for a zero-size parameter
            groups.setdefault(v.dtype, []).append(k)
    return pv, gv, groups


def _on_cuda(views):
    """Whether the update runs the CUDA kernels: the arrays are on a GPU (then all of them on the
    first one's device and framework), or CPU arrays go to the SIMT emulator
    (:func:`bnbcy.kernels.emulating`)."""
    views = [v for v in views if v is not None]
    ncuda = sum([v.is_cuda for v in views])
    if ncuda and ncuda != len(views):
        raise ValueError("optimizer update: parameters, gradients and states must all be on the same "
                         "device (got a mix of CPU and CUDA arrays)")
    if ncuda:
        for v in views:
            _arrays.check_same_device(v, views[0], v.name)
    return bool(views) and backends.on_cuda(views[0])


def _unorm_vecs(unorm_vecs, max_unorm):
    """``unorm_vec`` entries, when the update writes them: writable float32 arrays of one element."""
    views = []
    for k, u in enumerate(unorm_vecs):
        if u is None or max_unorm <= 0.0:
            views.append(None)
            continue
        v = _inplace_view(u, "unorm_vec" if len(unorm_vecs) == 1 else f"unorm_vecs[{k}]", ("float32",),
                          allow_empty=False)
        if v.numel != 1:
            raise ValueError(f"unorm_vec must be a float32 array of one element (receives the squared update "
                             f"norm), got {v.numel} elements")
        views.append(v)
    return views


def _start(optimizer_name, ps, gs, per_param, step_values, max_unorm):
    """What both array entries check first: the name, one entry per parameter in every list, the
    steps and ``max_unorm``."""
    kernel = _table.kernel(optimizer_name)
    ps, gs = list(ps), list(gs)
    count = len(ps)
    if len(gs) != count:
        raise ValueError(f"gs has {len(gs)} entries but ps has {count}")
    lists = [as_list(v, count, k) for k, v in per_param.items()]
    return kernel, ps, gs, count, lists, steps(step_values, count), real(max_unorm, "max_unorm")


def _finish(kernel, eight, ps, gs, pv, gv, groups, s1v, s2v, a1v, a2v, q1v, q2v, unorm_vecs, uv, step_list,
            param_norms, hyper, gnorm_scale):
    _arrays.check_no_overlap(*pv, *s1v, *s2v, *a1v, *a2v, *uv, inputs=(*gv, q1v, q2v))  # updated in place
    cuda = _on_cuda(pv + gv + s1v + s2v + a1v + a2v + uv + [q1v, q2v])
    if cuda and kernel.rule == "lion" and hyper.max_unorm > 0:
        raise NotImplementedError("max_unorm is not supported for lion (bitsandbytes does not expose it)")
    check_not_capturing(cuda)
    return Update(kernel, eight, ps, gs, pv, gv, s1v, s2v, a1v, a2v, q1v, q2v, unorm_vecs, step_list, param_norms,
                  hyper, real(gnorm_scale, "gnorm_scale"), groups, cuda)


def update_32bit(optimizer_name, gs, ps, state1s, state2s, steps_, beta1, beta2, beta3, alpha, eps, weight_decay,
                 lr, gnorm_scale=1.0, unorm_vecs=None, max_unorm=0.0, skip_zeros=False, param_norms=None):
    """Validate a 32-bit update (the arguments of ``optimizer_update_32bit_multi``).

    Returns
    -------
    Update
    """
    kernel, ps, gs, count, (state1s, state2s, unorm_vecs), step_list, max_unorm = _start(
        optimizer_name, ps, gs, {"state1s": state1s, "state2s": state2s, "unorm_vecs": unorm_vecs}, steps_,
        max_unorm)
    uv = _unorm_vecs(unorm_vecs, max_unorm)
    if param_norms is not None:
        param_norms = [x if hasattr(x, "__dlpack__") else real(x, "param_norm")
                       for x in as_list(param_norms, count, "param_norms")]
    pv, gv, groups = _params(ps, gs)
    s1v, s2v = [], []
    for k in range(count):
        v = _inplace_view(_required(state1s[k], "state1"), "state1", ("float32",))
        if kernel.state1_lead:
            _sized(v, f"{kernel.name} state1", kernel.state1_lead * pv[k].numel, (kernel.state1_lead, *pv[k].shape))
        else:
            _sized(v, "state1", pv[k].numel)
        s1v.append(v)
        s2v.append(None if kernel.states == 1 else _sized(
            _inplace_view(_required(state2s[k], f"{kernel.name}'s state2"), "state2", ("float32",)),
            "state2", pv[k].numel))
    hyper = _hyper(beta1, beta2, beta3, alpha, eps, weight_decay, lr, max_unorm, skip_zeros)
    return _finish(kernel, False, ps, gs, pv, gv, groups, s1v, s2v, [None] * count, [None] * count, None, None,
                   unorm_vecs, uv, step_list, param_norms, hyper, gnorm_scale)


def update_8bit(optimizer_name, gs, ps, state1s, state2s, beta1, beta2, beta3, alpha, eps, steps_, lr, qmap1, qmap2,
                absmax1s, absmax2s, weight_decay=0.0, gnorm_scale=1.0, skip_zeros=False, max_unorm=0.0,
                unorm_vecs=None, param_norms=None):
    """Validate an 8-bit blockwise update (the arguments of ``optimizer_update_8bit_blockwise_multi``).

    Returns
    -------
    Update
    """
    kernel, ps, gs, count, (state1s, state2s, absmax1s, absmax2s, unorm_vecs), step_list, max_unorm = _start(
        optimizer_name, ps, gs, {"state1s": state1s, "state2s": state2s, "absmax1s": absmax1s,
                                 "absmax2s": absmax2s, "unorm_vecs": unorm_vecs}, steps_, max_unorm)
    uv = _unorm_vecs(unorm_vecs, max_unorm)
    two, lead = kernel.states == 2, kernel.state1_lead
    pv, gv, groups = _params(ps, gs)
    q1v = _sized(_arrays.input_view(_required(qmap1, "qmap1"), "qmap1", ("float32",)), "qmap1 (the 256 values "
                 "of the signed dynamic map)", 256)
    q2v = None
    if two:
        q2v = _sized(_arrays.input_view(_required(qmap2, f"{kernel.name}'s qmap2"), "qmap2", ("float32",)),
                     "qmap2 (the 256 values of the unsigned dynamic map)", 256)
    s1v, s2v, a1v, a2v = [], [], [], []
    for k in range(count):
        n = pv[k].numel
        nb = -(-n // BLOCKSIZE)
        s1 = _inplace_view(_required(state1s[k], "state1"), "state1", ("uint8",))
        a1 = _inplace_view(_required(absmax1s[k], "absmax1"), "absmax1", ("float32",))
        if lead:
            s1v.append(_sized(s1, f"{kernel.name} state1", lead * n, (lead, *pv[k].shape)))
            a1v.append(_sized(a1, f"{kernel.name} absmax1 ({lead}, {nb})", lead * nb))
        else:
            s1v.append(_sized(s1, "state1", n))
            a1v.append(_sized(a1, "absmax1 (one value per 256 elements)", nb))
        if two:
            s2 = _inplace_view(_required(state2s[k], f"{kernel.name}'s state2"), "state2", ("uint8",))
            a2 = _inplace_view(_required(absmax2s[k], f"{kernel.name}'s absmax2"), "absmax2", ("float32",))
            s2v.append(_sized(s2, "state2", n))
            a2v.append(_sized(a2, "absmax2 (one value per 256 elements)", nb))
        else:
            s2v.append(None)
            a2v.append(None)
    hyper = _hyper(beta1, beta2, beta3, alpha, eps, weight_decay, lr, max_unorm, skip_zeros)
    return _finish(kernel, True, ps, gs, pv, gv, groups, s1v, s2v, a1v, a2v, q1v, q2v, unorm_vecs, uv, step_list,
                   param_norms, hyper, gnorm_scale)


# ------------------------------------------------------------------------ the optimizer classes
def check_hyper(cfg, nbetas):
    """Range checks of bitsandbytes' constructors, applied to a group or a resolved config."""
    lr, eps, wd = cfg["lr"], cfg["eps"], cfg["weight_decay"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = float(lr)
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= wd:
        raise ValueError(f"Invalid weight_decay value: {wd}")
    betas = cfg["betas"]
    try:
        n = len(betas)
    except TypeError:
        raise ValueError(f"betas must be a tuple of floats, got {betas!r}") from None
    if n < nbetas:
        raise ValueError(f"betas needs at least {nbetas} values, got {tuple(betas)}")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")


def check_percentile_clipping(pc):
    """``percentile_clipping`` must be an int in [0, 100] (100: off)."""
    if isinstance(pc, bool) or not isinstance(pc, int) or not 0 <= pc <= 100:
        raise ValueError(f"percentile_clipping must be an int in [0, 100], got {pc!r}")


def check_config(config, p, nbetas):
    """The resolved config of one parameter (group values, optimizer args, overrides)."""
    check_hyper(config, nbetas)
    bits = config["optim_bits"]
    if bits not in (8, 32):
        raise NotImplementedError(f"Amount of optimizer bits not supported: {bits}")
    check_percentile_clipping(config["percentile_clipping"])
    if not config["max_unorm"] >= 0.0:
        raise ValueError(f"Invalid max_unorm value: {config['max_unorm']}")
    for key in ("t_alpha", "t_beta3"):
        t = config.get(key)
        if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1):
            raise ValueError(f"{key} must be None or a positive int, got {t!r}")
    check_config_for(config, p)


def check_config_for(config, p):
    """The part of :func:`check_config` that depends on the parameter (a config shared by a group's
    parameters is checked whole once, this part for each)."""
    if config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"] and not config["block_wise"]:
        raise ValueError("block_wise=False (one absmax per tensor) was removed in bitsandbytes 0.50; "
                         "bnbcy only implements block-wise 8-bit optimizer state (block_wise=True)")


def check_param(name, p, device):
    """A parameter and its gradient, with torch.optim's exception types; ``device``: the group's
    device so far (None for the first parameter)."""
    check_grad(name, p, p.grad)
    if device is not None and p.device != device:
        raise RuntimeError(f"{name}: all parameters of a param group must be on one device; "
                           f"found {device} and {p.device}")
    if p.device.type not in DEVICE_TYPES:
        raise NotImplementedError(f"{name}: bnbcy's optimizer kernels do not run on {p.device.type} "
                                  f"tensors yet (supported: {', '.join(DEVICE_TYPES)})")


def check_grad(name, p, g):
    """The gradient ``g`` of ``p`` and the dtypes (the part of :func:`check_param` that a new
    gradient of a parameter checked at an earlier step needs)."""
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(f"{name} does not support sparse gradients (got layout {g.layout}); "
                           "use a dense gradient (e.g. Embedding(sparse=False))")
    if p.is_complex() or g.is_complex():
        raise TypeError(f"{name} does not support complex tensors (param {p.dtype}, grad {g.dtype})")
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"{name} supports float32, float16 and bfloat16 parameters, got {p.dtype}")
    if g.dtype != p.dtype:
        raise TypeError(f"gradient dtype {g.dtype} differs from parameter dtype {p.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"gradient shape {tuple(g.shape)} differs from parameter shape {tuple(p.shape)}")
    if g.device != p.device:
        raise RuntimeError(f"gradient on {g.device} but parameter on {p.device}")


def expected_state(shape, numel, kernel, eight, config):
    """``{key: (shape, dtype)}`` of the state tensors of a parameter (what ``init_state`` makes)."""
    key = (tuple(shape), kernel, eight, config["max_unorm"] > 0.0, config["percentile_clipping"] < 100)
    got = _EXPECTED.get(key)
    if got is None:
        if len(_EXPECTED) > 4096:              # bounded: a model has few distinct shapes
            _EXPECTED.clear()
        got = _EXPECTED[key] = _expected_state(shape, numel, kernel, eight, config)
    return got


_EXPECTED: dict = {}


def _expected_state(shape, numel, kernel, eight, config):
    lead = kernel.state1_lead
    shape = tuple(shape)
    dtype = torch.uint8 if eight else torch.float32
    out = {"state1": ((lead, *shape) if lead else shape, dtype)}
    if kernel.states == 2:
        out["state2"] = (shape, dtype)
    if eight:
        nblocks = -(-numel // BLOCKSIZE)
        out["qmap1"] = ((256,), torch.float32)
        out["absmax1"] = ((lead, nblocks) if lead else (nblocks,), torch.float32)
        if kernel.states == 2:
            out["qmap2"] = ((256,), torch.float32)
            out["absmax2"] = ((nblocks,), torch.float32)
    if config["max_unorm"] > 0.0 and not lead:
        out["unorm_vec"] = ((1,), torch.float32)
    if config["percentile_clipping"] < 100:
        out["gnorm_vec"] = ((GNORM_HISTORY,), torch.float32)
    return out


_VIEW_DTYPES = {torch.uint8: "uint8", torch.float32: "float32"}


def check_state(state, p, pv, kernel, config, known=None):
    """The existing state of ``p`` (e.g. from ``load_state_dict``) against what the step reads and
    writes; ``pv``: the view of the tensor the kernels update (``p``, or its shard). Returns the
    step count and ``{key: (tensor, view)}`` of the state tensors the kernels touch (``known``:
    views already made, by ``id``)."""
    if "state1" not in state or "step" not in state:
        raise KeyError(f"optimizer state of a parameter lacks 'state1'/'step' (keys: {sorted(state)})")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step < MAX_STEP:
        raise ValueError(f"optimizer state 'step' must be an int in [0, {MAX_STEP}), got {step!r}")
    s1 = state["state1"]
    if not isinstance(s1, torch.Tensor) or s1.dtype not in _VIEW_DTYPES:
        raise ValueError(f"optimizer state 'state1' must be a float32 or uint8 tensor, got "
                         f"{getattr(s1, 'dtype', type(s1).__name__)}")
    known = {} if known is None else known
    out = {}
    device = pv.device_type, pv.device_id
    for key, (shape, dtype) in expected_state(pv.shape, pv.numel, kernel, s1.dtype == torch.uint8, config).items():
        t = state.get(key)
        if not isinstance(t, torch.Tensor):
            raise KeyError(f"optimizer state '{key}' is missing (a {dtype} tensor of shape {shape} expected)")
        v = known.get(id(t)) or view(t, key)
        if v.dtype != _VIEW_DTYPES[dtype] or v.shape != shape:
            raise ValueError(f"optimizer state '{key}' must be {dtype} of shape {shape} for a parameter of "
                             f"shape {tuple(p.shape)}, got {t.dtype} of shape {tuple(t.shape)}")
        if (v.device_type, v.device_id) != device and not getattr(t, "is_paged", False):
            raise RuntimeError(f"optimizer state '{key}' is on {t.device} but its parameter on {p.device}")
        if not v.contiguous:
            raise ValueError(f"optimizer state '{key}' must be contiguous")
        out[key] = (t, v)
    return int(step), out


def hyper_at(config, step, schedules):
    """The :class:`Hyper` record of one parameter at ``step``, with the AdEMAMix schedules (§6.7)
    applied when ``schedules``; ``ValueError`` for a schedule that cannot be evaluated."""
    betas = config["betas"]
    beta1 = float(betas[0])
    beta2 = float(betas[1]) if len(betas) > 1 else 0.0
    beta3 = float(betas[2]) if len(betas) >= 3 else 0.0
    alpha = float(config.get("alpha", 0.0) or 0.0)
    t_alpha, t_beta3 = config.get("t_alpha"), config.get("t_beta3")
    if schedules and (t_alpha or t_beta3):
        if t_alpha:
            alpha = min(step * alpha / t_alpha, alpha)
        if t_beta3:
            if not (0.0 < beta1 < 1.0 and 0.0 < beta3 < 1.0):
                raise ValueError(f"the t_beta3 schedule needs 0 < beta1 < 1 and 0 < beta3 < 1 "
                                 f"(it interpolates their logarithms), got beta1={beta1}, beta3={beta3}")
            ln1, ln3 = math.log(beta1), math.log(beta3)
            s = step / t_beta3
            den = (1 - s) * ln3 + s * ln1
            beta3 = min(math.exp(ln1 * ln3 / den), beta3) if den != 0.0 else beta3
    return Hyper(lr=float(config["lr"]), beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha,
                 eps=float(config["eps"]), weight_decay=float(config["weight_decay"]),
                 max_unorm=float(config["max_unorm"]), skip_zeros=bool(config["skip_zeros"]))


def view(t, name):
    """The view of a tensor :func:`check_param` / :func:`check_state` checked or ``init_state``
    made (no second check)."""
    return _C.view(t.detach() if t.requires_grad else t, name)


# ------------------------------------------------------------------------ layouts checked at an earlier step
fingerprint = _C.tensor_fingerprint     # address, shape, strides, dtype: what a view is made of
state_fingerprint = _C.state_fingerprint


_PLAIN = (float, int, bool, str, type(None))


def plain_config(config):
    """Whether a config holds only numbers, strings and tuples of them: then equal configs
    mean equal hyper-parameters (a tensor value can change in place and still compare equal)."""
    for v in config.values():
        if type(v) not in _PLAIN and not (type(v) is tuple and all(type(x) in _PLAIN for x in v)):
            return False
    return True


class Layout:
    """One parameter as the optimizer's step found it valid (:func:`check_param`,
    :func:`check_config`, :func:`check_state`), with the views made then, so that a later step
    checks only that nothing it read has changed (:meth:`step_if_current`).

    What it relies on, and why each cannot change unnoticed: the parameter's fingerprint
    (:func:`fingerprint`: a re-assigned ``.data``, a reshape, a dtype change alter it); the state
    dict and each state tensor are the same objects (``load_state_dict`` and re-assignment replace
    them) with the same address, size and dtype (:func:`state_fingerprint`: ``resize_``, ``set_``,
    ``.data`` re-pointed at other memory, a reallocated storage alter it -- the memory a cached
    view points at may be freed then; what it does not see, a state tensor re-shaped over memory
    it already had, from the same address, leaves the cached view pointing at that memory, which
    the tensor still holds); the config is the same object (the optimizer keeps a group's config
    object only while a freshly resolved one compares equal to it). Only parameters that are not
    sharded, not empty, contiguous and have a state get one.

    The gradient is not held (that would keep alive the memory ``zero_grad`` frees): its
    fingerprint at the last check (``gfp``) tells the step whether it is the checked one again
    (``same_grad``). ``stamp``: the optimizer's count of overlap checks when this layout last took
    part in one.
    """
    __slots__ = ("p", "pfp", "device", "config", "state", "nkeys", "tensors", "maps", "outputs",
                 "inputs", "eight", "row", "qid", "gfp", "same_grad", "stamp")

    def __init__(self, kernel, p, pv, device, config, state, tensors):
        self.p, self.pfp, self.device, self.config, self.state = p, fingerprint(p), device, config, state
        self.nkeys = len(state)
        fps = [(key, t, state_fingerprint(t)) for key, (t, _) in tensors.items()]
        self.tensors = tuple(f for f in fps if not f[0].startswith("qmap"))
        self.maps = tuple(f for f in fps if f[0].startswith("qmap"))      # shared by the group
        self.outputs = [pv] + [v for key, (_, v) in tensors.items() if not key.startswith("qmap")]
        self.inputs = [v for key, (_, v) in tensors.items() if key.startswith("qmap")]
        self.eight = tensors["state1"][0].dtype == torch.uint8
        # what a kernel call takes: the parameter's view, then state_views'
        self.row = (pv, *state_views(kernel, self.eight, state, {id(t): v for t, v in tensors.values()}))
        self.qid = id(tensors["qmap1"][0]) if self.eight else None      # one kernel call per map
        self.gfp, self.same_grad = None, False
        self.stamp = -1

    def step_if_current(self, config, state, seen, g):
        """The state's step count if this layout still describes the parameter, its ``config``
        and ``state``; -1 if anything changed (the step then checks the parameter again).
        ``seen``: the ids of the shared maps already fingerprinted by this step. Sets
        ``same_grad``: whether the gradient ``g`` has the fingerprint checked last time."""
        if config is not self.config or state is not self.state or len(state) != self.nkeys:
            return -1
        match = _C.layout_matches(self.p, self.pfp, state, self.tensors, self.maps, seen, g, self.gfp)
        step = state.get("step")
        if not match or type(step) is not int or not 0 <= step < MAX_STEP:
            return -1
        self.same_grad = match == 2
        return step


    def check_new_grad(self, name, g):
        """:func:`check_grad` of a gradient other than the one checked last time; returns its
        fingerprint. The parameter is the valid one of this layout, so the gradient fits when it
        is strided with the parameter's dtype, shape and device; otherwise :func:`check_grad`
        says why."""
        try:
            gfp = fingerprint(g)
        except RuntimeError:              # no memory to point at (a tensor subclass): as check_grad finds
            gfp = None
        if gfp is None or gfp[3] is not self.pfp[3] or gfp[1] != self.pfp[1] or g.device != self.device:
            check_grad(name, self.p, g)
        return gfp


def check_views(outputs, inputs):
    """The step's in-place tensors must not share memory with each other or with an input."""
    _arrays.check_no_overlap(*outputs, inputs=inputs)


_STATE_VIEWS = ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")


def state_views(kernel, eight, state, views):
    """The views of one parameter's state tensors that a kernel call takes, in the order
    ``state1, state2, absmax1, absmax2, qmap1, qmap2`` (None for those the optimizer does not
    keep), from ``views`` (by ``id``; a tensor without one, a state just made by ``init_state``,
    is viewed here)."""
    two = kernel.states == 2
    takes = (True, two, eight, eight and two, eight, eight and two)
    out = []
    for key, wanted in zip(_STATE_VIEWS, takes):
        t = state.get(key) if wanted else None
        out.append(None if t is None else views.get(id(t)) or view(t, key))
    return tuple(out)


def checked_update(kernel, eight, ps, gs, pv, gv, sv, q1, q2, states, steps_, hyper, gnorm_scale):
    """The :class:`Update` of tensors the optimizer's plan checked: ``pv``/``gv`` and ``sv`` (the
    lists of :func:`state_views`) their views, ``states`` their state dicts."""
    unorm = [s.get("unorm_vec") for s in states] if hyper.max_unorm > 0.0 else [None] * len(states)
    groups = {}
    for k, x in enumerate(pv):
        if x.numel:
            groups.setdefault(x.dtype, []).append(k)
    return Update(kernel, eight, ps, gs, pv, gv, *sv, q1, q2, unorm, steps_, None, hyper,
                  float(gnorm_scale), groups, backends.on_cuda(pv[0]))

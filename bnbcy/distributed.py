"""bnbcy inside ``torch.distributed``: sharded parameters, global norms, distributed
checkpoints and DDP (see ``docs/distributed.md``).

* Sharded parameters -- a DTensor (FSDP2 ``fully_shard``) or a view into an FSDP1
  ``FlatParameter`` shard (``use_orig_params=True``). Kernels see only a rank's local shard
  (:func:`local`); optimizer state is kept per shard, as FSDP expects.
* Global norms -- LAMB/LARS's trust ratio needs ``||p||`` and ``||update||`` of the whole
  parameter: :func:`global_trust_ratios` sums the per-shard sums of every sharded LAMB/LARS
  parameter in one batched all-reduce (:func:`all_reduce_sums`) before the step changes
  anything.
* Held weights -- :func:`copy_in_place` loads quantized codes into the parameter FSDP holds
  (a DTensor shard, too); :func:`has_storage` tells a tensor whose storage FSDP freed.
* Optimizer state dicts -- for sharded parameters :func:`optimizer_state_to_sharded` gives a
  form FSDP's ``optim_state_dict``/``get_optimizer_state_dict`` and DCP understand (every
  tensor has the parameter's shape and placement, the 8-bit block maxima repeated per
  element); :func:`optimizer_state_from_sharded` reads it back (bit-exact on the same
  sharding, requantized on another).
* The packed quant-state entry -- bitsandbytes' JSON blob has a value-dependent length,
  which DCP's planner rejects (``Size mismatch between saved torch.Size([170]) and current:
  torch.Size([169])``). Distributed state dicts (sharded or FSDP-held weights, or inside
  :func:`fixed_length_quant_state`) pad it with JSON whitespace to a fixed length.
* DDP -- :func:`check_quant_state_consistency` compares the quantization statistics
  across ranks (the modules also expose them as non-persistent buffers, which DDP
  broadcasts with the weights).
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading

import torch

__all__ = ["is_dtensor", "is_sharded", "local", "all_reduce_sums", "global_trust_ratios",
           "fixed_length_quant_state", "use_fixed_length_blob", "pad_blob", "FIXED_BLOB_BYTES",
           "optimizer_state_to_sharded", "optimizer_state_from_sharded", "check_quant_state_consistency",
           "copy_in_place", "has_storage"]

# Length of the padded quant-state blob: bitsandbytes' JSON for a 2-D weight is ~170-260 bytes.
FIXED_BLOB_BYTES = 512
_STATE_BLOCKSIZE = 256            # the 8-bit optimizer state's block size (optim/optimizer.py)

_tls = threading.local()


# ------------------------------------------------------------------------ sharded tensors
def _dtensor_type():
    """``DTensor``, or None without torch.distributed; imported once (the optimizer asks
    :func:`is_dtensor` several times per parameter per step, and an import statement in the
    function cost ~3 us a call)."""
    global _DTENSOR
    if _DTENSOR is False:
        _DTENSOR = None
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor
            _DTENSOR = DTensor
    return _DTENSOR


_DTENSOR = False  # not looked up yet


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _is_fsdp1_view(t) -> bool:
    # FSDP1 marks the original parameters it flattened into a FlatParameter
    return bool(getattr(t, "_fsdp_flattened", False)) and not is_dtensor(t)


def is_sharded(t) -> bool:
    """Whether ``t`` is (a view of) one rank's shard of a larger parameter: a DTensor, or an
    original parameter flattened by FSDP1."""
    return is_dtensor(t) or _is_fsdp1_view(t)


def local(t):
    """The rank-local tensor behind ``t`` (the DTensor's shard, sharing its storage); ``t``
    itself otherwise. ``None`` stays ``None``."""
    if is_dtensor(t):
        return t._local_tensor
    return t


def _shard_groups(p):
    """Process groups over which ``p``'s shards are spread (a sum over them is a global sum)."""
    if is_dtensor(p):
        from torch.distributed.tensor import Shard
        mesh = p.device_mesh
        return [mesh.get_group(d) for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if _is_fsdp1_view(p):
        return [None]                # FSDP1 without a process_group argument shards over WORLD
    return []


def all_reduce_sums(values, params):
    """Global sums of per-shard float64 sums.

    Parameters
    ----------
    values : torch.Tensor
        float64 ``[n, k]``: row ``i`` holds ``k`` sums over the local shard of ``params[i]``.
    params : list of torch.Tensor
        The parameters (DTensor or FSDP1 views; plain tensors are left as they are).

    Returns
    -------
    torch.Tensor
        ``values`` with each row summed over the ranks holding shards of its parameter. Every
        rank must call this with the same parameters in the same order (collective).
    """
    out = values.clone()
    by_groups = {}
    for i, p in enumerate(params):
        by_groups.setdefault(tuple(id(g) for g in _shard_groups(p)), (_shard_groups(p), []))[1].append(i)
    for groups, rows in by_groups.values():
        if not groups:
            continue
        part = out[rows].contiguous()
        for g in groups:
            torch.distributed.all_reduce(part, group=g)
        out[rows] = part
    return out


# ------------------------------------------------------------------------ the quant-state blob
@contextlib.contextmanager
def fixed_length_quant_state():
    """State dicts taken inside this context pad the packed quant-state entry to
    :data:`FIXED_BLOB_BYTES` bytes, as distributed state dicts always do.

    Use it for a plain (unsharded) module that saves to or loads from a
    ``torch.distributed.checkpoint``, whose planner needs every entry's size to be
    independent of the values::

        with bnbcy.distributed.fixed_length_quant_state():
            dcp.load(model.state_dict(), checkpoint_id=path)   # then model.load_state_dict(...)
    """
    depth = getattr(_tls, "depth", 0)
    _tls.depth = depth + 1
    try:
        yield
    finally:
        _tls.depth = depth


def use_fixed_length_blob(weight) -> bool:
    """Whether a state dict holding ``weight`` is a distributed one (fixed-length blob)."""
    return getattr(_tls, "depth", 0) > 0 or is_sharded(weight)


def pad_blob(blob: torch.Tensor) -> torch.Tensor:
    """The packed JSON ``blob`` (uint8) followed by spaces up to :data:`FIXED_BLOB_BYTES`
    (a multiple of it for an unusually long one). JSON readers, bitsandbytes' included,
    skip the trailing whitespace."""
    n = blob.numel()
    size = max(FIXED_BLOB_BYTES, -(-n // FIXED_BLOB_BYTES) * FIXED_BLOB_BYTES)
    out = torch.full((size,), ord(" "), dtype=torch.uint8, device=blob.device)
    out[:n] = blob
    return out


# ------------------------------------------------------------------------ optimizer state
def _like_param(t, p, lead=0):
    """``t`` (a rank-local tensor of ``p``'s local shape, optionally with ``lead`` leading
    dims) as a tensor placed like ``p``: a DTensor for a DTensor ``p``, else itself."""
    if not is_dtensor(p):
        return t
    from torch.distributed.tensor import DTensor, Shard
    placements = [Shard(pl.dim + lead) if isinstance(pl, Shard) else pl for pl in p.placements]
    shape = tuple(t.shape[:lead]) + tuple(p.shape)
    return DTensor.from_local(t, p.device_mesh, placements, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride(), run_check=False)


def _lead(state1, p_local):
    return state1.dim() - p_local.dim()


def optimizer_state_to_sharded(p, state: dict) -> dict:
    """One parameter's optimizer state in the form FSDP and DCP gather and shard.

    Every tensor takes the parameter's (local) shape -- placed like ``p`` when ``p`` is a
    DTensor -- so a sharded checkpoint holds each rank's piece and a full one the whole
    state: ``state1``/``state2`` as they are (8-bit codes or float32), the 8-bit block maxima
    ``absmax1``/``absmax2`` repeated for each element of their block (for FSDP1, which gathers
    all of a parameter's states in one dtype, the 8-bit codes as float32). The shared maps
    ``qmap1``/``qmap2`` and the per-step scratch ``unorm_vec`` are left out (rebuilt on load).

    Parameters
    ----------
    p : torch.Tensor
        The sharded parameter (DTensor or FSDP1 view).
    state : dict
        Its state as the optimizer keeps it (rank-local tensors).
    """
    pl = local(p).detach()
    out = {}
    lead = _lead(state["state1"], pl) if "state1" in state else 0
    for k, v in state.items():
        if k in ("qmap1", "qmap2", "unorm_vec"):
            continue
        if k in ("absmax1", "absmax2") and isinstance(v, torch.Tensor):
            lead_k = lead if k == "absmax1" else 0
            rows = v.reshape(-1, v.shape[-1]) if lead_k else v.reshape(1, -1)
            per_elem = rows.repeat_interleave(_STATE_BLOCKSIZE, dim=1)[:, :pl.numel()]
            v = per_elem.reshape((*v.shape[:lead_k], *pl.shape)) if lead_k else per_elem.reshape(pl.shape)
            out[k] = _like_param(v.contiguous(), p, lead_k)
        elif k in ("state1", "state2") and isinstance(v, torch.Tensor):
            if v.dtype == torch.uint8 and not is_dtensor(p):
                v = v.float()    # FSDP1 gathers all of a parameter's states in one dtype (codes are exact)
            out[k] = _like_param(v, p, lead if k == "state1" else 0)
        else:
            out[k] = v
    # FSDP1 all-gathers a parameter's tensor states in one buffer in sorted-name order and
    # hands them back in the dict's order: keep the two the same
    return dict(sorted(out.items()))


def optimizer_state_from_sharded(p, state: dict, qmap) -> dict:
    """Inverse of :func:`optimizer_state_to_sharded` for this rank's shard of ``p``.

    When the repeated block maxima are constant over each of this shard's 256-element
    blocks (the sharding that saved them), the state comes back bit-exact; otherwise (another
    world size or wrapping) the 8-bit state is dequantized per element and requantized in
    this shard's blocks.

    Parameters
    ----------
    p : torch.Tensor
        The sharded parameter.
    state : dict
        The loaded entries (DTensor or local tensors).
    qmap : callable
        ``qmap(name, device)`` -> the optimizer's ``"dynamic"``/``"udynamic"`` map.

    Raises
    ------
    ValueError
        If a tensor's shape does not match this rank's shard.
    """
    pl = local(p)
    st = {k: (v.to_local() if is_dtensor(v) else v) for k, v in state.items()}
    if "state1" not in st:
        return st
    lead = _lead(st["state1"], pl)
    for n, name in (("1", "dynamic"), ("2", "udynamic")):
        s, a = st.get("state" + n), st.get("absmax" + n)
        if s is None:
            continue
        lead_k = lead if n == "1" else 0
        if tuple(s.shape[lead_k:]) != tuple(pl.shape):
            raise ValueError(f"optimizer state{n} has shape {tuple(s.shape)}, but this rank's shard of the "
                             f"parameter has shape {tuple(pl.shape)}")
        if a is None:
            continue
        if tuple(a.shape) != tuple(s.shape):
            raise ValueError(f"optimizer absmax{n} in the sharded form must have state{n}'s shape "
                             f"{tuple(s.shape)}, got {tuple(a.shape)}")
        if s.dtype != torch.uint8:           # FSDP1's float32 copy of the 8-bit codes
            if not bool(((s >= 0) & (s <= 255) & (s == s.round())).all()):
                raise ValueError(f"optimizer state{n} beside absmax{n} must hold 8-bit codes 0..255")
            s = s.to(torch.uint8)
        code = qmap(name, pl.device)
        st["qmap" + n] = code
        st["state" + n], st["absmax" + n] = _compact_blocks(s.contiguous(), a.contiguous(), code, lead_k)
    return st


def _compact_blocks(codes, per_elem, code, lead):
    """8-bit codes + per-element maxima -> codes + per-block maxima of this shard's blocks."""
    rows_c = codes.reshape(max(1, codes.shape[0] if lead else 1), -1)
    rows_a = per_elem.reshape(rows_c.shape).float()
    n = rows_c.shape[1]
    nb = -(-n // _STATE_BLOCKSIZE)
    pad = nb * _STATE_BLOCKSIZE - n
    padded = torch.nn.functional.pad(rows_a, (0, pad), value=float("nan")).reshape(rows_a.shape[0], nb, -1)
    first = padded[:, :, 0]
    exact = bool(((padded == first[:, :, None]) | padded.isnan()).all())
    if exact:
        absmax = first.contiguous()
        return codes, (absmax.reshape(-1) if not lead else absmax)
    # another sharding: requantize the values in this shard's blocks
    from .functional.blockwise import quantize_blockwise
    values = code.float()[rows_c.long()] * rows_a
    new_codes, absmaxes = [], []
    for row in values:
        q, qs = quantize_blockwise(row.contiguous(), code=code, blocksize=_STATE_BLOCKSIZE)
        new_codes.append(q)
        absmaxes.append(qs.absmax.float())
    new_codes = torch.stack(new_codes).reshape(codes.shape)
    absmax = torch.stack(absmaxes)
    return new_codes, (absmax.reshape(-1) if not lead else absmax)


# ------------------------------------------------------------------------ DDP
def _quant_tensors(module):
    """name -> quantization statistic of a bnbcy 4-bit or LLM.int8 layer (empty otherwise)."""
    from .nn.modules import Linear4bit, Linear8bitLt
    out = {}
    if isinstance(module, Linear4bit):
        qs = getattr(module.weight, "quant_state", None) or module.quant_state
        if qs is not None:
            out["absmax"] = qs.absmax
            if qs.nested:
                out["nested_absmax"] = qs.state2.absmax
                out["nested_offset"] = qs.offset
    elif isinstance(module, Linear8bitLt):
        scb = module._scb()
        if scb is not None:
            out["SCB"] = scb
    return out


def check_quant_state_consistency(model, group=None) -> None:
    """Raise if the quantized weights or their statistics differ across ranks.

    DDP broadcasts rank 0's parameters and buffers when it wraps a model; bnbcy's 4-bit and
    LLM.int8 layers expose ``absmax``/nested state/``SCB`` as non-persistent buffers, so they
    travel with the codes. Call this after wrapping (or after loading per-rank checkpoints)
    to make sure no rank computes with different weights. Collective: every rank calls it.

    Raises
    ------
    RuntimeError
        Naming the first module and statistic whose values differ across ranks.
    """
    import torch.distributed as dist
    items = []
    for name, m in model.named_modules():
        stats = _quant_tensors(m)
        if stats:
            stats = {"weight": local(m.weight).detach(), **stats}
        for k, t in stats.items():
            items.append((f"{name}.{k}" if name else k, t))
    if not items:
        return
    # one float64 fingerprint per tensor: its bytes summed with position weights
    fp = torch.stack([_fingerprint(t) for _, t in items])
    lo, hi = fp.clone(), fp.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    bad = [n for (n, _), a, b in zip(items, lo, hi) if not torch.equal(a, b)]
    if bad:
        raise RuntimeError(f"quantized weights differ across ranks: {', '.join(bad[:5])}"
                           f"{' ...' if len(bad) > 5 else ''}. Build or load the base weights identically on "
                           f"every rank, or let DDP broadcast them (bnbcy layers register their statistics as "
                           f"buffers, which DDP broadcasts from rank 0 when it wraps the model)")


def _fingerprint(t):
    b = t.detach().contiguous().reshape(-1).cpu().view(torch.uint8).to(torch.float64)
    pos = torch.arange(1, b.numel() + 1, dtype=torch.float64)
    return torch.stack([b.sum(), (b * pos).sum(), (b * b * pos.remainder(97)).sum(),
                        torch.tensor(float(b.numel()), dtype=torch.float64)])


# ------------------------------------------------------------------------ optimizer hooks
# Called from bnbcy/optim/optimizer.py at the points marked "distributed hook".
def uses_8bit_state(p, min_8bit_size) -> bool:
    """The 8-bit / 32-bit state decision, the same on every rank: by the DTensor's global
    size; an FSDP1 view (whose global size is unknown here) of any non-empty size."""
    if _is_fsdp1_view(p):
        return p.numel() > 0
    return p.numel() >= min_8bit_size


def check_sharded_config(p, config) -> None:
    """Refuse what has no per-shard meaning.

    Raises
    ------
    NotImplementedError
        ``percentile_clipping < 100`` on a sharded parameter (the gradient-norm history
        would be per shard).
    """
    if config["percentile_clipping"] < 100 and is_sharded(p):
        raise NotImplementedError(
            "percentile_clipping < 100 is not supported for sharded (FSDP/DTensor) parameters: the clipping "
            "history would hold per-shard norms. Clip the global norm instead (FSDP's clip_grad_norm_ or "
            "torch.nn.utils.clip_grad_norm_ on the DTensors)")


def make_contiguous(p) -> None:
    """Make the local storage of ``p`` and of its gradient contiguous (the kernels update
    them in place)."""
    if is_dtensor(p):
        with torch.no_grad():
            if not p._local_tensor.is_contiguous():
                p._local_tensor = p._local_tensor.contiguous()
            if not p.grad._local_tensor.is_contiguous():
                p.grad._local_tensor = p.grad._local_tensor.contiguous()
        return
    if not p.is_contiguous():
        p.data = p.data.contiguous()
    if not p.grad.is_contiguous():
        p.grad = p.grad.contiguous()


def global_trust_ratios(optimizer, plan) -> dict:
    """The per-shard ``max_unorm`` that gives each sharded LAMB/LARS parameter the trust
    ratio of the whole parameter, for this step (collective: every rank calls it).

    The kernel scales a shard's update by ``max_unorm * ||p|| / ||u||`` (when that is < 1)
    from the shard's own norms. A dry pass on copies of each shard and its state gives the
    shard's ``Σu²``; with ``Σu²`` and ``Σp²`` summed over the ranks the global scale ``s``
    follows, and the real pass runs with the ``max_unorm`` that makes the shard's scale equal
    ``s`` (``0``, no scaling, when ``s == 1``).

    The parameters are every sharded one with ``max_unorm > 0`` in the optimizer's groups,
    in group order -- the same list on every rank, whatever this rank holds: a rank with an
    empty piece (FSDP1) or no gradient contributes zeros. All their sums travel in one
    batched all-reduce per process group (one per step for FSDP1 or a 1-D mesh). Nothing
    is changed here, so the error below leaves parameters, state and step counters as
    they were, on every rank alike.

    Parameters
    ----------
    optimizer : bnbcy.optim.optimizer.Optimizer8bit
    plan : list
        ``optimizer._plan()``'s ``(gindex, group, items)`` (the parameters with gradients).

    Returns
    -------
    dict
        ``id(p)`` -> the ``max_unorm`` to launch ``p``'s shard with.

    Raises
    ------
    RuntimeError
        On every rank, if a parameter's global update must be scaled but some rank's piece
        of it is all zeros while its update is not (no per-shard ``max_unorm`` expresses
        that).
    """
    planned = {id(p): (group, gindex, pindex, hyper) for gindex, group, items in plan
               for pindex, p, _, hyper in items}
    params, rows = [], []
    for gindex, group in enumerate(optimizer.param_groups):
        for pindex, p in enumerate(group["params"]):
            if is_sharded(p) and optimizer.get_config(gindex, pindex, group)["max_unorm"] > 0.0:
                params.append(p)
                rows.append(_trust_sums(optimizer, p, planned.get(id(p))))
    if not params:
        return {}
    sums = all_reduce_sums(torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 3), params)
    ratios = {}
    for p, (u2_local, _, _), (u2, p2, zero_pieces) in zip(params, rows, sums.tolist()):
        if id(p) not in planned:
            continue
        max_unorm = planned[id(p)][3].max_unorm
        u_g, p_g = u2 ** 0.5, p2 ** 0.5
        scale = max_unorm * p_g / u_g if u_g > max_unorm * p_g else 1.0
        if scale < 1.0 and p_g > 0.0 and zero_pieces > 0:
            raise RuntimeError(
                f"{type(optimizer).__name__}: the global trust ratio scales the update of a sharded parameter "
                f"(this rank's piece: shape {tuple(local(p).shape)}) by {scale:.6g}, but {int(zero_pieces)} rank(s) "
                f"hold an all-zero piece of it with a non-zero update, which the per-shard kernel cannot scale; "
                f"initialise the parameter away from zero or use max_unorm=0. Nothing was changed")
        p_norm_local = float(torch.norm(local(p).detach().float())) if local(p).numel() else 0.0
        if scale >= 1.0 or u2_local == 0.0:
            ratios[id(p)] = 0.0
        elif p_g == 0.0:
            ratios[id(p)] = max_unorm              # every piece is zero: the kernel scales by 0 too
        else:
            ratios[id(p)] = scale * u2_local ** 0.5 / p_norm_local
    return ratios


def _trust_sums(optimizer, p, planned):
    """``[Σu², Σp², zero piece with an update]`` of this rank's piece of ``p`` (zeros
    where it holds nothing or ``p`` has no gradient here)."""
    pl = local(p).detach()
    p2 = float(pl.double().square().sum()) if pl.numel() else 0.0
    if planned is None or pl.numel() == 0:
        return [0.0, p2, 0.0]
    group, gindex, pindex, hyper = planned
    state = optimizer.state.get(p)
    if not state:                                  # first step: a fresh state, kept off the optimizer
        try:
            optimizer.init_state(group, p, gindex, pindex)
        finally:
            state = optimizer.state.pop(p, None)
    dry_p = pl.clone(memory_format=torch.contiguous_format)
    dry_p.grad = local(p.grad).contiguous()
    dry = {k: (v.clone() if isinstance(v, torch.Tensor) and k not in ("qmap1", "qmap2") else v)
           for k, v in state.items()}
    dry["step"] = state["step"] + 1
    config = optimizer.get_config(gindex, pindex, group)
    optimizer._launch(dry["state1"].dtype == torch.uint8, hyper, config["percentile_clipping"], [dry_p],
                      states=[dry])
    u2 = float(dry["unorm_vec"].reshape(-1)[0])
    return [u2, p2, 1.0 if (p2 == 0.0 and u2 > 0.0) else 0.0]


# ------------------------------------------------------------------------ state-dict helpers
def full(t):
    """A DTensor gathered to a plain tensor (collective); anything else unchanged."""
    return t.full_tensor() if is_dtensor(t) else t


def local_piece(t, like):
    """This rank's piece of the full plain tensor ``t``, sharded as the DTensor ``like``
    (no communication: every rank holds ``t``)."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def has_storage(t) -> bool:
    """Whether ``t``'s storage holds its elements (FSDP frees an unsharded parameter's
    storage between uses; reading such a tensor is undefined)."""
    if is_dtensor(t) or t.numel() == 0:
        return True
    needed = (t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()
    return t.untyped_storage().nbytes() >= needed


def copy_in_place(weight, codes, key):
    """Copy quantized ``codes`` (full, or a DTensor) into ``weight`` -- the parameter
    FSDP/optimizers hold, perhaps a DTensor -- without replacing it; the same bytes under
    another dtype view (``quant_storage``) are accepted. An error message, or None."""
    target = local(weight)
    if is_dtensor(weight) and not is_dtensor(codes):
        codes = local_piece(codes, weight)      # a full checkpoint into a sharded weight
    src = local(codes)
    if src.dtype != target.dtype:
        # same bytes, another quant_storage view
        if src.numel() * src.element_size() != target.numel() * target.element_size():
            return (f"size mismatch for {key}: {src.numel() * src.element_size()} bytes of packed codes "
                    f"({src.dtype}) cannot replace the {target.numel() * target.element_size()} bytes of "
                    f"this rank's weight ({target.dtype})")
        src = src.contiguous().reshape(-1).view(torch.uint8).view(target.dtype)
    if src.numel() != target.numel():
        return (f"size mismatch for {key}: copying packed codes of shape {tuple(src.shape)} into a weight of "
                f"shape {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(src.reshape(target.shape))
    return None


def expose_quant_state(weight, quant_state) -> None:
    """Set ``quant_state`` and the names of its state-dict entries (``absmax``,
    ``quant_map``, ``nested_*``) as attributes of a DTensor weight, as :class:`Params4bit`
    exposes them, so FQN resolution by getattr finds them."""
    weight.quant_state = quant_state
    for k, v in quant_state.as_dict(packed=False).items():
        if isinstance(v, torch.Tensor):
            setattr(weight, k, v)

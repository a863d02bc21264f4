"""Distributed scenarios (torch.distributed, gloo or NCCL) shared by ``tests/test_distributed.py``
and the bitsandbytes comparison (``python tests/_dist_scenarios.py compare``).

A scenario runs on every rank of a process group and returns a dict of numbers; the
launcher (:func:`launch`) starts the ranks as subprocesses with a time limit and collects
what each rank wrote. ``BNBCY_DIST_LIB=bitsandbytes`` runs the same scenarios with
bitsandbytes 0.50.2 instead of bnbcy.

Model: 2 blocks of ``Linear4bit(nf4, quant_storage=bf16, compute_dtype=bf16)`` + LoRA
adapters (bf16), tiny sizes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch
from torch import nn

LIB = os.environ.get("BNBCY_DIST_LIB", "bnbcy")
# "cuda" for the NCCL variant: rank r uses cuda:r (set by the worker)
DEVICE = os.environ.get("BNBCY_DIST_DEVICE", "cpu")
D, R, BATCH = 64, 4, 8


def _lib():
    return __import__(LIB)


# ------------------------------------------------------------------------------------ model
class Block(nn.Module):
    def __init__(self, g, storage=torch.bfloat16, int8=False):
        super().__init__()
        bnb = _lib()
        if int8:
            self.base = bnb.nn.Linear8bitLt(D, D, bias=False, has_fp16_weights=False)
        else:
            self.base = bnb.nn.Linear4bit(D, D, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                          quant_storage=storage)
        with torch.no_grad():
            self.base.weight.data.copy_(torch.randn(D, D, generator=g) / 8)
        dt = torch.float32 if int8 else torch.bfloat16
        self.A = nn.Parameter((torch.randn(R, D, generator=g) / 8).to(dt))
        self.B = nn.Parameter((torch.randn(D, R, generator=g) / 8).to(dt))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


class Model(nn.Module):
    def __init__(self, seed=0, int8=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.b1, self.b2 = Block(g, int8=int8), Block(g, int8=int8)
        # with the LLM.int8 base also a trainable float head: under FSDP1 its weight straddles the
        # ranks' shards and its bias lies wholly on rank 1 (an empty piece on rank 0)
        self.head = None
        if int8:
            self.head = nn.Linear(D, D)
            with torch.no_grad():
                self.head.weight.copy_(torch.randn(D, D, generator=g) / 8)
                self.head.bias.copy_(torch.randn(D, generator=g) / 8)

    def forward(self, x):
        y = self.b2(torch.nn.functional.gelu(self.b1(x)))
        return y if self.head is None else self.head(y)


def build(seed=0, base="4bit"):
    """The model with a 4-bit (bf16 adapters) or an LLM.int8 (float32 adapters) base."""
    m = Model(seed, int8=base == "8bit")
    return m.to(DEVICE)         # quantizes


def dtype_of(model):
    """The dtype the model computes in: float32 with an LLM.int8 base, else bfloat16."""
    return torch.float32 if int8_weights(model) else torch.bfloat16


def data(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, D, generator=g).to(DEVICE, dtype),
            torch.randn(BATCH, D, generator=g).to(DEVICE, dtype))


def probe(dtype=torch.bfloat16):
    return torch.randn(5, D, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)


# ------------------------------------------------------------------------------------ wrapping
def _is_block(module, recurse, nonwrapped_numel):
    return recurse or isinstance(module, Block)


def int8_weights(model):
    """The int8 weights of the LLM.int8 layers: FSDP1 cannot flatten integer tensors
    ("Cannot flatten integer dtype tensors"), so they are left out of its flat parameters
    (``ignored_states``: kept whole on every rank)."""
    return [m.weight for m in model.modules() if isinstance(m, _lib().nn.Linear8bitLt)]


def wrap(model, how):
    if how == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        return FSDP(model, use_orig_params=True, auto_wrap_policy=_is_block, device_id=torch.device(DEVICE),
                    ignored_states=int8_weights(model) or None)
    if how == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for b in (model.b1, model.b2):
            fully_shard(b)
        return fully_shard(model)
    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if how == "plain":
        return model
    raise ValueError(how)


def make_optimizer(name, params):
    bnb = _lib()
    params = [p for p in params if p.requires_grad]
    kw = {"lr": 1e-2}
    if name.endswith("8bit"):
        kw["min_8bit_size"] = 128
    if name.startswith(("LAMB", "LARS")):
        kw["lr"] = 5e-2
    if name.startswith("LARS"):
        kw["momentum"] = 0.9
    return getattr(bnb.optim, name)(params, **kw)


def _shard_batch(x, rank, world):
    return x.chunk(world)[rank] if world > 1 else x


def train(model, opt, steps, rank, world):
    """Global (all-rank mean) losses of ``steps`` steps on the batch split across ranks."""
    import torch.distributed as dist
    x, y = data(dtype_of(model))
    xs, ys = _shard_batch(x, rank, world), _shard_batch(y, rank, world)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xs).float(), ys.float())
        loss.backward()
        opt.step()
        val = loss.detach().reshape(1).clone()
        if world > 1:
            dist.all_reduce(val)
            val /= world
        losses.append(float(val))
    return losses


def _fixed_length():
    if LIB == "bnbcy":
        import bnbcy.distributed
        return bnbcy.distributed.fixed_length_quant_state()
    return contextlib.nullcontext()


def _out(model):
    with torch.no_grad():
        out = model(probe(dtype_of(model))).float()
    if hasattr(model, "reshard"):
        # FSDP2 keeps the root's own parameters (the head) unsharded after a forward without
        # backward; a state-dict load into them needs them sharded again
        model.reshard()
    return out


def _same(a, b):
    return bool(a.shape == b.shape and torch.equal(a, b))


# ------------------------------------------------------------------------------------ scenarios
def sc_train(rank, world, how="fsdp1", optim="AdamW", steps=10, base="4bit"):
    """QLoRA training under ``how`` vs the same run in one process (rank 0 computes it);
    ``base="8bit"``: a frozen ``Linear8bitLt`` base with float32 adapters."""
    model = wrap(build(base=base), how)
    losses = train(model, make_optimizer(optim, model.parameters()), steps, rank, world)
    res = {"losses": losses}
    if rank == 0:
        ref = build(base=base)
        res["ref"] = train(ref, make_optimizer(optim, ref.parameters()), steps, 0, 1)
        res["max_rel"] = max(abs(a - b) / abs(b) for a, b in zip(losses, res["ref"]))
        res["decreased"] = losses[-1] < losses[0]
    return res


def _state_dict_fsdp1(model, kind):
    from torch.distributed.fsdp import FullOptimStateDictConfig
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType
    if kind != "full":
        return FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT)
    # offload_to_cpu=False: with CPU tensors torch's "offload" (.cpu()) copies nothing, and every
    # state of a parameter comes back as a view of one reused gather buffer (torch 2.13, FSDP1)
    return FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False))


def _trained(how, seed=0, steps=2, rank=0, world=1, base="4bit"):
    model = wrap(build(seed, base), how)
    # torch's AdamW: the checkpoint scenarios test the modules, whatever library's optimizer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, opt, steps, rank, world)
    return model


def _ckpt_funcs(path):
    """(how, kind, save(model) -> sd, load(model, sd) -> result) of a checkpoint path."""
    how, kind = path.split("_")
    if how == "fsdp1":
        def save(m):
            with _state_dict_fsdp1(m, kind):
                return m.state_dict()

        def load(m, sd):
            with _state_dict_fsdp1(m, kind):
                return m.load_state_dict(sd)
        return how, kind, save, load
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)
    opts = StateDictOptions(full_state_dict=kind == "full")
    return (how, kind, lambda m: get_model_state_dict(m, options=opts),
            lambda m, sd: set_model_state_dict(m, sd, options=opts))


def sc_ckpt(rank, world, path="fsdp1_full", tmp=None, base="4bit"):
    """Save under one setting, load into a model built from another seed, compare."""
    if path == "dcp":
        return _ckpt_dcp(rank, world, tmp, base)
    how, kind, save, load = _ckpt_funcs(path)
    src = _trained(how, rank=rank, world=world, base=base)
    want = _out(src)
    sd = save(src)
    res = {"has_quant_state": any(k.endswith(("SCB", "quant_state.bitsandbytes__nf4")) for k in sd)}
    full_copy = {k: v.clone() for k, v in sd.items()} if kind == "full" else None   # FSDP2's set_* rewrites sd
    dst = wrap(build(5, base), how)
    before = _out(dst)
    result = load(dst, sd)
    res["missing"], res["unexpected"] = list(result.missing_keys), list(result.unexpected_keys)
    res["exact"] = _same(_out(dst), want)
    res["changed"] = not _same(before, want)
    if kind == "full":
        # a checkpoint saved under FSDP loads into a plain model, and back
        plain = build(9, base)
        plain.load_state_dict(full_copy)
        res["into_plain_exact"] = _same(_out(plain), want)
        back = wrap(build(11, base), how)
        load(back, plain.state_dict())
        res[f"plain_into_{how}_exact"] = _same(_out(back), want)
    return res


def _ckpt_dcp(rank, world, tmp, base):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    src = _trained("fsdp2", rank=rank, world=world, base=base)
    want = _out(src)
    res = {}
    # torch.distributed.checkpoint: sharded save on 2 ranks, load on 2, reshard 2 -> 1 -> 2
    import torch.distributed.checkpoint as dcp
    ck = os.path.join(tmp, "dcp2")
    dcp.save(get_model_state_dict(src), checkpoint_id=ck)
    dst = wrap(build(5, base), "fsdp2")
    sd = get_model_state_dict(dst)
    dcp.load(sd, checkpoint_id=ck)
    set_model_state_dict(dst, sd)
    res["exact"] = _same(_out(dst), want)
    ck1 = os.path.join(tmp, "dcp1")
    if rank == 0:          # 2 ranks -> 1 process (a plain model, no process group use)
        plain = build(9, base)
        with _fixed_length():
            psd = plain.state_dict()
            dcp.load(psd, checkpoint_id=ck, no_dist=True)
        plain.load_state_dict(psd)
        res["reshard_2to1_exact"] = _same(_out(plain), want)
        with _fixed_length():
            dcp.save(plain.state_dict(), checkpoint_id=ck1, no_dist=True)
    dist.barrier()
    back = wrap(build(11, base), "fsdp2")     # 1 -> 2 ranks
    sd = get_model_state_dict(back)
    dcp.load(sd, checkpoint_id=ck1)
    set_model_state_dict(back, sd)
    res["reshard_1to2_exact"] = _same(_out(back), want)
    return res


def _optim_state_tensors(osd):
    """Flat name -> tensor of an optimizer state dict (for a bit-exact comparison)."""
    out = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, w in v.items():
                walk(f"{prefix}.{k}", w)
        elif isinstance(v, torch.Tensor):
            out[prefix] = v.full_tensor() if hasattr(v, "full_tensor") else v
        elif isinstance(v, (int, float)):
            out[prefix] = torch.tensor(v)
    walk("", osd["state"])
    return out


def sc_optim(rank, world, how="fsdp1", optim="AdamW8bit", kind="full", tmp=None, base="4bit"):
    """Optimizer state dict under FSDP: save after 3 steps, load into a fresh optimizer,
    compare the state bit-exact and the next 2 steps' losses."""
    import torch.distributed as dist
    model = wrap(build(0, base), how)
    opt = make_optimizer(optim, model.parameters())
    train(model, opt, 3, rank, world)
    res = {}
    if how == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with _state_dict_fsdp1(model, kind):
            osd = FSDP.optim_state_dict(model, opt)
            msd = model.state_dict()
        saved = {k: v.clone() for k, v in _optim_state_tensors(osd).items()} if kind == "full" else None
        model2 = wrap(build(5, base), how)
        opt2 = make_optimizer(optim, model2.parameters())
        with _state_dict_fsdp1(model2, kind):
            model2.load_state_dict(msd)
            opt2.load_state_dict(FSDP.optim_state_dict_to_load(model2, opt2, osd))
            again = FSDP.optim_state_dict(model2, opt2)
    else:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=kind == "full")
        osd = get_optimizer_state_dict(model, opt, options=opts)
        msd = get_model_state_dict(model, options=opts)
        if kind == "dcp":
            import torch.distributed.checkpoint as dcp
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(tmp, "opt"))
        model2 = wrap(build(5, base), how)
        opt2 = make_optimizer(optim, model2.parameters())
        train(model2, opt2, 1, rank, world)        # state exists, with other values
        if kind == "dcp":
            tgt = {"model": get_model_state_dict(model2, options=opts),
                   "optim": get_optimizer_state_dict(model2, opt2, options=opts)}
            dcp.load(tgt, checkpoint_id=os.path.join(tmp, "opt"))
            msd, osd = tgt["model"], tgt["optim"]
        set_model_state_dict(model2, msd, options=opts)
        set_optimizer_state_dict(model2, opt2, osd, options=opts)
        again = get_optimizer_state_dict(model2, opt2, options=opts)
        saved = _optim_state_tensors(get_optimizer_state_dict(model, opt, options=opts))
    if saved is not None or how != "fsdp1":
        new = _optim_state_tensors(again)
        res["state_exact"] = (set(saved) == set(new)) and all(_same(saved[k].cpu(), new[k].cpu()) for k in saved)
        res["n_state_tensors"] = len(saved)
    la = train(model, opt, 2, rank, world)
    lb = train(model2, opt2, 2, rank, world)
    res["continue_exact"] = la == lb
    res["losses"] = [la, lb]
    dist.barrier()
    return res


def sc_ddp(rank, world, base="4bit", optim="AdamW8bit"):
    """DDP over different per-rank base weights: rank 0's codes *and* statistics must reach
    every rank (DDP broadcasts parameters and buffers), then training tracks one process."""
    import torch.distributed as dist
    model = build(rank * 13, base)       # each rank its own base weights
    mine = _out(model)
    ddp = wrap(model, "ddp")
    got = _out(ddp)
    allv = [torch.empty_like(got) for _ in range(world)]
    dist.all_gather(allv, got)
    res = {"ranks_agree": all(_same(allv[0], a) for a in allv)}
    if rank == 0:
        res["equals_rank0_model"] = _same(got, mine)
    if LIB == "bnbcy":
        import bnbcy.distributed
        bnbcy.distributed.check_quant_state_consistency(ddp.module)     # must pass after wrapping
        # statistics changed on one rank only (no broadcast): the check must say so
        stat = _first_stat(ddp.module)
        if rank == 1:
            with torch.no_grad():
                stat.add_(1)
        try:
            bnbcy.distributed.check_quant_state_consistency(ddp.module)
            res["mismatch_detected"] = False
        except RuntimeError as exc:
            res["mismatch_detected"] = "differ across ranks" in str(exc)
        if rank == 1:
            with torch.no_grad():
                stat.sub_(1)
    losses = train(ddp, make_optimizer(optim, ddp.parameters()), 5, rank, world)
    res["losses"] = losses
    if rank == 0:
        ref = build(0, base)
        res["ref"] = train(ref, make_optimizer(optim, ref.parameters()), 5, 0, 1)
        res["max_rel"] = max(abs(a - b) / abs(b) for a, b in zip(losses, res["ref"]))
    return res


def _first_stat(model):
    for m in model.modules():
        for name, b in m.named_buffers(recurse=False):
            if name.startswith("_qs_"):
                return b
    raise AssertionError("no quantization statistic buffer")


def sc_trust_error(rank, world, optim="LAMB8bit"):
    """A trust-ratio step whose global scale cannot be applied (rank 0's piece of the head
    weight all zeros, its update not) raises on every rank before anything changes."""
    import torch.distributed as dist
    model = wrap(build(base="8bit"), "fsdp1")
    opt = make_optimizer(optim, model.parameters())
    train(model, opt, 1, rank, world)
    # a step's collectives: one batched all-reduce for every LAMB parameter, whatever each rank holds
    calls, all_reduce = [], dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or all_reduce(*a, **k)
    try:
        train(model, opt, 1, rank, world)
    finally:
        dist.all_reduce = all_reduce
    head_w = model.module.head.weight
    res = {"all_reduces_per_step": len(calls) - 1}      # less train()'s loss all-reduce
    res["piece_numel"] = head_w.numel()
    if rank == 0:
        with torch.no_grad():
            head_w.zero_()                # this rank's piece of it
    x, y = data(dtype_of(model))
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(_shard_batch(x, rank, world)), _shard_batch(y, rank, world)).backward()
    params = [p.detach().clone() for p in model.parameters()]
    before = _optim_state_tensors(opt.state_dict())
    before = {k: v.clone() for k, v in before.items()}
    try:
        opt.step()
        res["outcome"] = "stepped"
    except Exception as exc:   # noqa: BLE001
        res["outcome"] = f"{type(exc).__name__}: {exc}"
    after = _optim_state_tensors(opt.state_dict())
    res["params_unchanged"] = all(_same(a, b.detach()) for a, b in zip(params, model.parameters()))
    res["state_unchanged"] = set(before) == set(after) and all(_same(before[k], after[k]) for k in before)
    res["n_state"] = len(before)
    return res


def sc_dtensor_kernel(rank, world):
    """A DTensor handed to a functional op is refused, not dereferenced (no segfault)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(DEVICE, (world,))
    t = distribute_tensor(torch.randn(64, 64), mesh, [Shard(0)])
    bnb = _lib()
    res = {}
    try:
        bnb.functional.quantize_blockwise(t)
        res["outcome"] = "accepted"
    except Exception as exc:   # noqa: BLE001
        res["outcome"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if LIB == "bnbcy":      # below the op layer: the tensor view every kernel call goes through
        from bnbcy import _C
        try:
            _C.view(t, "A")
            res["view"] = "accepted"
        except Exception as exc:   # noqa: BLE001
            res["view"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return res


SCENARIOS = {"train": sc_train, "ckpt": sc_ckpt, "optim": sc_optim, "ddp": sc_ddp,
             "dtensor_kernel": sc_dtensor_kernel, "trust_error": sc_trust_error}


# ------------------------------------------------------------------------------------ launcher
def _worker(argv):
    rank, world, port, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    jobs = json.loads(argv[4])
    backend = os.environ.get("BNBCY_DIST_BACKEND", "gloo")
    import datetime
    global DEVICE
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
        DEVICE = f"cuda:{rank}"

    import torch.distributed as dist
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=float(os.environ.get("BNBCY_DIST_TIMEOUT", 20))))
    torch.manual_seed(0)
    results = {}
    tmp = os.path.join(out, "tmp")
    os.makedirs(tmp, exist_ok=True)
    for name, (scenario, kwargs) in jobs.items():
        kw = dict(kwargs)
        if "tmp" in SCENARIOS[scenario].__code__.co_varnames:
            kw["tmp"] = os.path.join(tmp, name)
        t0 = time.time()
        try:
            results[name] = SCENARIOS[scenario](rank, world, **kw)
        except Exception as exc:   # noqa: BLE001 -- reported to the test
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.time() - t0, 2)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        try:
            dist.barrier()
        except Exception:   # noqa: BLE001 -- a peer died; report what we have
            break
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(jobs, world=2, timeout=120, lib=None):
    """Run ``jobs`` ({name: (scenario, kwargs)}) on ``world`` ranks (subprocesses); returns
    ``(results, info)`` with ``results[rank][name]`` the scenario's dict. Processes are
    killed at ``timeout`` seconds; ``info`` has each rank's return code and stderr tail."""
    env = dict(os.environ)
    if lib:
        env["BNBCY_DIST_LIB"] = lib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(r), str(world),
                                   str(port), out, json.dumps(jobs)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for r in range(world)]
        deadline = time.time() + timeout
        info = []
        for p in procs:
            try:
                _, err = p.communicate(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
                err = f"[killed after {timeout} s]\n" + err
            info.append({"rc": p.returncode, "stderr": err[-4000:]})
        results = []
        for r in range(world):
            try:
                with open(os.path.join(out, f"rank{r}.json")) as f:
                    results.append(json.load(f))
            except (OSError, ValueError):
                results.append({})
    return results, info


# ------------------------------------------------------------------------------------ comparison
COMPARE = {
    "train_fsdp1": ("train", {"how": "fsdp1", "optim": "AdamW"}),
    "train_fsdp2": ("train", {"how": "fsdp2", "optim": "AdamW"}),
    "train_fsdp1_adamw8bit": ("train", {"how": "fsdp1", "optim": "AdamW8bit"}),
    "train_fsdp2_adamw8bit": ("train", {"how": "fsdp2", "optim": "AdamW8bit"}),
    "train_fsdp2_lamb8bit": ("train", {"how": "fsdp2", "optim": "LAMB8bit"}),
    "ckpt_fsdp1_full": ("ckpt", {"path": "fsdp1_full"}),
    "ckpt_fsdp1_sharded": ("ckpt", {"path": "fsdp1_sharded"}),
    "ckpt_fsdp2_full": ("ckpt", {"path": "fsdp2_full"}),
    "ckpt_fsdp2_sharded": ("ckpt", {"path": "fsdp2_sharded"}),
    "ckpt_dcp": ("ckpt", {"path": "dcp"}),
    "optim_fsdp1_full": ("optim", {"how": "fsdp1", "kind": "full"}),
    "optim_fsdp2_full": ("optim", {"how": "fsdp2", "kind": "full"}),
    "optim_fsdp2_sharded": ("optim", {"how": "fsdp2", "kind": "sharded"}),
    "optim_fsdp2_dcp": ("optim", {"how": "fsdp2", "kind": "dcp"}),
    "ddp_4bit": ("ddp", {"base": "4bit", "optim": "AdamW"}),
    "ddp_8bit": ("ddp", {"base": "8bit", "optim": "AdamW"}),
    "dtensor_kernel": ("dtensor_kernel", {}),
    # LAMB/LARS under FSDP1 (the global trust ratio); the LLM.int8 base models have a float
    # head whose FSDP1 pieces straddle the ranks
    "train_fsdp1_lamb8bit": ("train", {"how": "fsdp1", "optim": "LAMB8bit"}),
    **{f"train_fsdp1_int8_{o.lower()}": ("train", {"how": "fsdp1", "optim": o, "base": "8bit"})
       for o in ("LAMB8bit", "LARS8bit", "LAMB32bit")},
    "trust_error_fsdp1": ("trust_error", {}),
    "optim_fsdp1_lamb8bit_full": ("optim", {"how": "fsdp1", "optim": "LAMB8bit", "kind": "full"}),
    "optim_fsdp2_lamb8bit_sharded": ("optim", {"how": "fsdp2", "optim": "LAMB8bit", "kind": "sharded"}),
    "optim_fsdp1_int8_full": ("optim", {"how": "fsdp1", "kind": "full", "base": "8bit"}),
    "optim_fsdp2_int8_dcp": ("optim", {"how": "fsdp2", "kind": "dcp", "base": "8bit"}),
    # Linear8bitLt (frozen int8 base) under FSDP1 / FSDP2 / DCP
    **{f"train_{h}_int8_adamw8bit": ("train", {"how": h, "optim": "AdamW8bit", "base": "8bit"})
       for h in ("fsdp1", "fsdp2")},
    **{f"ckpt_{p}_int8": ("ckpt", {"path": p, "base": "8bit"})
       for p in ("fsdp1_full", "fsdp1_sharded", "fsdp2_full", "fsdp2_sharded", "dcp")},
}


def compare(names=None):
    """Each scenario alone (a crash ends only its own run), bnbcy then bitsandbytes."""
    rows = {}
    for name, job in COMPARE.items():
        if names and name not in names:
            continue
        for lib in ("bnbcy", "bitsandbytes"):
            res, info = launch({name: job}, lib=lib, timeout=150)
            r0 = res[0].get(name)
            if r0 is None:
                rc = [i["rc"] for i in info]
                r0 = {"crash": f"return codes {rc}", "stderr": info[0]["stderr"][-300:]}
            else:
                r0 = {k: (v[:400] if isinstance(v, str) else v) for k, v in r0.items() if k != "trace"}
            rows.setdefault(name, {})[lib] = r0
            print(name, lib, json.dumps(r0)[:400], flush=True)
    return rows


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor()


def write_compare(path, names=None):
    """Run :func:`compare` and write ``path`` (with ``names``: update those rows of it)."""
    import bitsandbytes
    old = {}
    if names and os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get("scenarios", {})
    rows = {**old, **compare(names)}
    out = {"what": "each scenario on 2 gloo CPU processes, bnbcy vs bitsandbytes, the same script",
           "command": "python tests/_dist_scenarios.py compare bench/results/distributed_compare.json [NAME,...]",
           "machine": {"cpu": _cpu(), "cores": os.cpu_count(),
                       "note": "results are outcomes and loss ratios, not timings (seconds: on a shared machine)"},
           "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "scenarios": rows}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        _worker(sys.argv[2:])
    elif sys.argv[1] == "compare":
        if len(sys.argv) > 2:
            write_compare(sys.argv[2], sys.argv[3].split(",") if len(sys.argv) > 3 else None)
        else:
            compare()

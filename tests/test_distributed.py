"""bnbcy inside torch.distributed: 2 processes, gloo, on the CPU (NCCL on 2 GPUs when present).

The scenarios live in ``tests/_dist_scenarios.py`` (also run against bitsandbytes 0.50.2 for
``bench/results/distributed_compare.json``: ``python tests/_dist_scenarios.py compare
bench/results/distributed_compare.json``); each group of them runs in one launch of 2 subprocesses
with a time limit, so a crash or a hang fails the tests instead of stopping the run.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _dist_scenarios as S  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

TRAIN_OPTIMS = ["AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion8bit", "AdamW32bit", "LAMB8bit", "LARS8bit",
                "LAMB32bit"]
# with the LLM.int8 base (and a float head whose FSDP1 pieces straddle the ranks)
INT8_OPTIMS = ["AdamW8bit", "LAMB8bit", "LARS8bit", "LAMB32bit"]
TRAIN = [(h, b, o) for h in ("fsdp1", "fsdp2") for b, opts in (("4bit", TRAIN_OPTIMS), ("8bit", INT8_OPTIMS))
         for o in opts]
CKPT_PATHS = ["fsdp1_full", "fsdp1_sharded", "fsdp2_full", "fsdp2_sharded"]
GROUPS = {
    "train": {f"{h}_{b}_{o}": ("train", {"how": h, "optim": o, "base": b}) for h, b, o in TRAIN},
    "ckpt": {**{f"ckpt_{p}_{b}": ("ckpt", {"path": p, "base": b}) for p in CKPT_PATHS + ["dcp"]
                for b in ("4bit", "8bit")},
             "optim_fsdp1_full": ("optim", {"how": "fsdp1", "kind": "full"}),
             **{f"optim_fsdp2_{k}": ("optim", {"how": "fsdp2", "kind": k}) for k in ("full", "sharded", "dcp")},
             "optim_fsdp2_lion8bit_dcp": ("optim", {"how": "fsdp2", "optim": "Lion8bit", "kind": "dcp"}),
             "optim_fsdp1_lamb8bit_full": ("optim", {"how": "fsdp1", "optim": "LAMB8bit", "kind": "full"}),
             "optim_fsdp2_lamb8bit_sharded": ("optim", {"how": "fsdp2", "optim": "LAMB8bit", "kind": "sharded"}),
             # the LLM.int8 base's float head: FSDP1 pieces of unequal size straddling the ranks
             "optim_fsdp1_int8_full": ("optim", {"how": "fsdp1", "kind": "full", "base": "8bit"}),
             "optim_fsdp2_int8_dcp": ("optim", {"how": "fsdp2", "kind": "dcp", "base": "8bit"})},
    "ddp": {"ddp_4bit": ("ddp", {"base": "4bit", "optim": "AdamW8bit"}),
            "ddp_8bit": ("ddp", {"base": "8bit", "optim": "AdamW"}),
            "dtensor_kernel": ("dtensor_kernel", {}),
            "trust_error": ("trust_error", {})},
}

_cache = {}


def _run(group, backend="gloo"):
    key = (group, backend)
    if key not in _cache:
        env = {"BNBCY_DIST_BACKEND": backend, "BNBCY_DIST_DEVICE": "cuda" if backend == "nccl" else "cpu"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            _cache[key] = S.launch(GROUPS[group], world=2, timeout=150)
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return _cache[key]


def _result(group, name, backend="gloo"):
    """Both ranks' result dicts for one scenario; fails with the error / crash it hit."""
    results, info = _run(group, backend)
    out = []
    for rank in range(2):
        r = results[rank].get(name)
        if r is None:
            pytest.fail(f"rank {rank} did not finish {name!r}: return code {info[rank]['rc']}\n"
                        f"{info[rank]['stderr'][-2000:]}")
        if "error" in r:
            pytest.fail(f"rank {rank} {name}: {r['error']}\n{r.get('trace', '')}")
        out.append(r)
    return out


BACKENDS = ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2),
    reason=f"NCCL variant needs 2 CUDA GPUs; this machine has "
           f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}"))]


# ------------------------------------------------------------------------------- training
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how,base,optim", TRAIN)
def test_qlora_training_tracks_single_process(how, base, optim, backend):
    r0, r1 = _result("train", f"{how}_{base}_{optim}", backend)
    assert r0["losses"] == r1["losses"]            # the all-reduced loss, the same on both ranks
    assert len(r0["losses"]) == 10 and r0["decreased"]
    assert r0["losses"][0] == pytest.approx(r0["ref"][0], rel=1e-6)    # same model, same data
    # afterwards: per-shard 8-bit blocks and reduction order differ from one process
    tol = 5e-3 if "8bit" in optim else 2e-3
    assert r0["max_rel"] < tol, (r0["losses"], r0["ref"])


# ------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["4bit", "8bit"])
@pytest.mark.parametrize("path", CKPT_PATHS)
def test_model_checkpoint_round_trip_is_bit_exact(path, base, backend):
    for r in _result("ckpt", f"ckpt_{path}_{base}", backend):
        assert r["missing"] == [] and r["unexpected"] == []
        assert r["changed"], "the target model must start different, or the test proves nothing"
        assert r["exact"]
        assert r["has_quant_state"]
        if path.endswith("full"):     # FSDP checkpoint -> plain model -> FSDP again
            assert r["into_plain_exact"]
            assert r[f"plain_into_{path.split('_')[0]}_exact"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["4bit", "8bit"])
def test_dcp_save_load_and_resharding(base, backend):
    r0, r1 = _result("ckpt", f"ckpt_dcp_{base}", backend)
    assert r0["exact"] and r1["exact"]
    assert r0["reshard_2to1_exact"]                     # 2 ranks -> 1 plain process
    assert r0["reshard_1to2_exact"] and r1["reshard_1to2_exact"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["optim_fsdp1_full", "optim_fsdp2_full", "optim_fsdp2_sharded", "optim_fsdp2_dcp",
                                  "optim_fsdp2_lion8bit_dcp", "optim_fsdp1_lamb8bit_full",
                                  "optim_fsdp2_lamb8bit_sharded", "optim_fsdp1_int8_full", "optim_fsdp2_int8_dcp"])
def test_8bit_optimizer_state_dict_round_trip(name, backend):
    for r in _result("ckpt", name, backend):
        assert r["n_state_tensors"] > 0 and r["state_exact"]
        assert r["continue_exact"], r["losses"]


# ------------------------------------------------------------------------------- DDP, kernels
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", ["4bit", "8bit"])
def test_ddp_broadcasts_codes_and_statistics(base, backend):
    r0, r1 = _result("ddp", f"ddp_{base}", backend)
    assert r0["ranks_agree"] and r1["ranks_agree"]
    assert r0["equals_rank0_model"]       # rank 1 built other weights: rank 0's codes *and* stats won
    assert r0["mismatch_detected"] and r1["mismatch_detected"]
    assert r0["losses"] == r1["losses"]
    assert r0["max_rel"] < 1e-3, (r0["losses"], r0["ref"])


def test_dtensor_into_a_kernel_is_refused():
    for r in _result("ddp", "dtensor_kernel"):
        # the op layer refuses it (torch's DTensor dispatch: no sharding rule for bnbcy's ops) ...
        assert r["outcome"].startswith(("RuntimeError", "NotImplementedError", "ValueError")), r
        assert "DTensor" in r["outcome"] or "NULL data pointer" in r["outcome"], r
        # ... and the tensor view below it refuses a NULL-pointer export with elements
        assert r["view"].startswith("ValueError") and "NULL data pointer" in r["view"], r


@pytest.mark.parametrize("backend", BACKENDS)
def test_trust_ratio_error_is_raised_on_every_rank_before_any_change(backend):
    """LAMB under FSDP1, rank 0's piece of a weight all zeros: the global scale cannot be
    applied there; both ranks raise (no hang) and nothing moved -- params, state, steps."""
    for r in _result("ddp", "trust_error", backend):
        assert r["outcome"].startswith("RuntimeError") and "all-zero piece" in r["outcome"], r
        assert r["n_state"] > 0 and r["state_unchanged"] and r["params_unchanged"], r
        assert r["all_reduces_per_step"] == 1, r        # the earlier, good step: one batched collective
        assert r["seconds"] < 60

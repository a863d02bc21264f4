"""transformers + PEFT + accelerate on bnbcy through the bitsandbytes stand-in (CPU), next to the
installed bitsandbytes on the same scenarios (``tests/integration_scenarios.py``).

Three interpreters, in order: bitsandbytes writes 4-/8-bit checkpoints (and runs the loading
scenarios for reference numbers); bnbcy, as ``bitsandbytes`` through ``BNBCY_AS_BITSANDBYTES=1``,
runs every scenario, loads bitsandbytes' checkpoints and writes its own; bitsandbytes loads
bnbcy's checkpoints.
"""
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from standin_run import run_py  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
STANDIN_SCENARIOS = "load4,load8,save4,save8,qlora,trainer"


def _scenarios(args, standin):
    return run_py(f"import sys; sys.path.insert(0, {TESTS!r}); import integration_scenarios as S; S.main({args!r})",
                  standin=standin, env={"OMP_NUM_THREADS": "1"}, timeout=900)


def _get(runs, who, name):
    """One scenario's result; its error (each scenario reports its own) fails the test."""
    res = runs[who]["scenarios"][name]
    if isinstance(res, dict) and "error" in res:
        pytest.fail(f"{who} {name}: {res['error']}\n{res['traceback']}")
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("hf"))
    real = _scenarios([work, "--scenarios", "base,load4,load8,trainer", "--write-ckpt", "bnb"], standin=False)
    ours = _scenarios([work, "--scenarios", STANDIN_SCENARIOS, "--read-ckpt", "bnb", "--write-ckpt", "bnbcy"],
                      standin=True)
    back = _scenarios([work, "--scenarios", "", "--read-ckpt", "bnbcy"], standin=False)
    return {"bnb": real, "bnbcy": ours, "back": back}


def test_the_standin_was_used(runs):
    assert "site-packages/bitsandbytes" in runs["bnb"]["library"]
    _get(runs, "bnb", "write_ckpt")
    _get(runs, "bnbcy", "write_ckpt")
    assert runs["bnbcy"]["library"].endswith(os.path.join("bnbcy", "__init__.py"))
    assert runs["bnbcy"]["bitsandbytes_version"].startswith("0.50.2+bnbcy")


@pytest.mark.parametrize("bits,cls", [("load4", "Linear4bit"), ("load8", "Linear8bitLt")])
def test_quantized_loading_forward_generate_dequantize(runs, bits, cls):
    ours, theirs = _get(runs, "bnbcy", bits), _get(runs, "bnb", bits)
    assert ours["classes"] == [f"bnbcy.nn.modules.{cls}"]
    # Same quantization as bitsandbytes: the dequantized weights are as far from fp32 as bnb's.
    assert ours["dequant_weight_vs_fp32"] == pytest.approx(theirs["dequant_weight_vs_fp32"], rel=1e-6)
    assert ours["logits_vs_fp32"] <= 1.1 * theirs["logits_vs_fp32"] + 1e-3
    assert ours["dequant_logits_vs_fp32"] <= 1.1 * theirs["dequant_logits_vs_fp32"] + 1e-4
    assert ours["generated"] == theirs["generated"]
    assert ours["repeat_equal"] and ours["dequant_dtype"] == "torch.float32"


@pytest.mark.parametrize("name", ["save4", "save8"])
def test_save_pretrained_from_pretrained_bit_exact(runs, name):
    res = _get(runs, "bnbcy", name)
    assert res["same_keys"] and res["state_dict_bit_exact"] and res["logits_bit_exact"]


def test_qlora_trains_saves_reloads_merges(runs):
    res = _get(runs, "bnbcy", "qlora")
    for opt in ("torch_adamw", "adamw8bit"):
        assert res[opt]["last"] < 0.9 * res[opt]["first"], (opt, res[opt])
    # 8-bit states track the 32-bit optimizer closely on this short run
    assert res["adamw8bit"]["last"] == pytest.approx(res["torch_adamw"]["last"], rel=0.02)
    assert res["adapter_reload_bit_exact"] and res["adapter_weights_bit_exact"]
    assert res["merged_classes"] == ["bnbcy.nn.modules.Linear4bit"]
    # merging re-quantizes base + B A to NF4: the error of one more 4-bit rounding, not more
    assert res["merged_rel"] < 0.3


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_trainer_bnb_optimizers_state_layout(runs, optim):
    res = _get(runs, "bnbcy", "trainer")[optim]
    assert res["optimizer"] == "bitsandbytes.optim.adamw.AdamW"   # bnbcy's class, named as bitsandbytes'
    # Trainer's override keeps the embedding's state in 32 bits; the linears' state is 8-bit blockwise
    assert res["embedding_state"] == ["state1:float32:[256, 64]", "state2:float32:[256, 64]"]
    assert "state1:uint8:[64, 64]" in res["q_proj_state"] and "absmax1:float32:[16]" in res["q_proj_state"]
    assert res["losses"][-1] < res["losses"][0]


def test_trainer_state_layout_is_bitsandbytes(runs):
    """Every parameter's optimizer state under the Trainer has bitsandbytes' keys, dtypes, shapes."""
    theirs, ours = _get(runs, "bnb", "trainer"), _get(runs, "bnbcy", "trainer")
    for optim in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        assert ours[optim]["state_layout"] == theirs[optim]["state_layout"]
        assert ours[optim]["losses"] == pytest.approx(theirs[optim]["losses"], rel=1e-3)


@pytest.mark.parametrize("direction", ["bnb_to_bnbcy", "bnbcy_to_bnb"])
def test_checkpoints_cross_between_the_libraries(runs, direction):
    res = _get(runs, "bnbcy" if direction == "bnb_to_bnbcy" else "back", "read_ckpt")
    reader = "bnbcy" if direction == "bnb_to_bnbcy" else "bitsandbytes"
    for bits, cls in (("4", "Linear4bit"), ("8", "Linear8bitLt")):
        assert res[bits]["classes"] == [f"{reader}.nn.modules.{cls}"]
        # same stored codes; the forwards differ only in the CPU matmul's rounding
        assert res[bits]["logits_rel"] < 0.02, (bits, res[bits])

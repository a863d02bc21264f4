"""transformers + PEFT + accelerate scenarios on a tiny Llama-style model, written for
bitsandbytes: run as is it uses the installed bitsandbytes; with ``BNBCY_AS_BITSANDBYTES=1`` (or
``--standin``) the same code runs on bnbcy. Used by ``tests/test_integration_hf.py`` and, for the
numbers next to bitsandbytes', from the command line::

    python tests/integration_scenarios.py WORKDIR [--standin] [--scenarios a,b] [--json OUT]

Prints one JSON object: per scenario its numbers (losses, max abs diffs, seconds) or its error.
Scenarios: ``base`` (generate and save the fp32 model), ``load4``, ``load8``, ``save4``,
``save8``, ``qlora``, ``trainer``, ``write_ckpt`` / ``read_ckpt`` (a 4- and an 8-bit checkpoint
for the other library to load).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

HIDDEN, LAYERS, VOCAB, SEQ = 64, 2, 256, 16


def _setup(standin):
    if standin:
        import bnbcy
        bnbcy.install_as_bitsandbytes()
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny model: threads only add scheduling stalls
    return torch


def _ids(torch, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=g)


def base(work):
    """The fp32 reference model, generated from a config and saved locally."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    path = os.path.join(work, "base")
    if not os.path.exists(os.path.join(path, "config.json")):
        cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                          tie_word_embeddings=False)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _fp32(work):
    from transformers import AutoModelForCausalLM
    import torch
    return AutoModelForCausalLM.from_pretrained(base(work), dtype=torch.float32).eval()


def _bnb_config(bits):
    import torch
    from transformers import BitsAndBytesConfig
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def _load(path, bits):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=_bnb_config(bits), device_map="cpu",
                                                dtype=torch.float32).eval()


def _logits(model, ids):
    import torch
    with torch.no_grad():
        return model(ids).logits.float()


def _maxdiff(a, b):
    return float((a.float() - b.float()).abs().max())


def _linear_classes(model):
    return sorted({type(m).__module__ + "." + type(m).__name__ for m in model.modules()
                   if "Linear" in type(m).__name__ and type(m).__name__ != "Linear"})


def _load_and_check(work, bits):
    import torch
    ids = _ids(torch)
    ref_model = _fp32(work)
    ref = _logits(ref_model, ids)
    t0 = time.perf_counter()
    model = _load(base(work), bits)
    load_s = time.perf_counter() - t0
    classes = _linear_classes(model)  # before dequantize(), which converts in place
    out = _logits(model, ids)
    gen = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    out_again = _logits(model, ids)  # a forward must not change what dequantize() gives
    deq = model.dequantize()
    deq_out = _logits(deq, ids)
    ref_sd = ref_model.state_dict()
    wdiff = max(_maxdiff(p, ref_sd[n]) for n, p in deq.state_dict().items() if n.endswith("proj.weight"))
    return {"load_s": load_s, "classes": classes, "logits_vs_fp32": _maxdiff(out, ref),
            "logits_rel": _maxdiff(out, ref) / float(ref.abs().max()), "repeat_equal": bool(torch.equal(out, out_again)),
            "generated": gen[0].tolist(), "dequant_weight_vs_fp32": wdiff, "dequant_logits_vs_fp32": _maxdiff(deq_out, ref),
            "dequant_dtype": str(next(deq.parameters()).dtype)}


def load4(work):
    return _load_and_check(work, 4)


def load8(work):
    return _load_and_check(work, 8)


def _save_reload(work, bits, tag):
    import torch
    ids = _ids(torch)
    model = _load(base(work), bits)
    out = _logits(model, ids)
    path = os.path.join(work, f"saved{bits}_{tag}")
    model.save_pretrained(path)
    again = _load(path, bits)
    sd1, sd2 = model.state_dict(), again.state_dict()
    same_keys = sorted(sd1) == sorted(sd2)
    exact = same_keys and all(torch.equal(sd1[k].cpu(), sd2[k].cpu()) for k in sd1)
    return {"state_dict_bit_exact": bool(exact), "same_keys": same_keys, "keys": len(sd1),
            "logits_bit_exact": bool(torch.equal(out, _logits(again, ids)))}


def save4(work, tag="x"):
    return _save_reload(work, 4, tag)


def save8(work, tag="x"):
    return _save_reload(work, 8, tag)


def _lora_model(work):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    model = _load(base(work), 4)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"],
                     task_type="CAUSAL_LM", init_lora_weights=True)
    return get_peft_model(model, cfg)


def _train(model, opt, steps, ids):
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    model.eval()
    return losses


def qlora(work, steps=30):
    import torch
    import bitsandbytes as bnb
    from peft import PeftModel
    ids = _ids(torch, batch=4, seed=2)
    res = {}
    for name, make in (("torch_adamw", lambda p: torch.optim.AdamW(p, lr=3e-3)),
                       ("adamw8bit", lambda p: bnb.optim.AdamW8bit(p, lr=3e-3))):
        torch.manual_seed(0)
        model = _lora_model(work)
        trainable = [p for p in model.parameters() if p.requires_grad]
        t0 = time.perf_counter()
        losses = _train(model, make(trainable), steps, ids)
        res[name] = {"first": losses[0], "last": losses[-1], "min": min(losses), "train_s": time.perf_counter() - t0,
                     "trainable": sum(p.numel() for p in trainable)}
    # adapter save/reload onto a fresh quantized base, then merge
    out = _logits(model, ids)
    apath = os.path.join(work, "adapter")
    model.save_pretrained(apath)
    fresh = PeftModel.from_pretrained(_load(base(work), 4), apath).eval()
    res["adapter_reload_bit_exact"] = bool(torch.equal(out, _logits(fresh, ids)))
    a_sd = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    b_sd = {k: v for k, v in fresh.state_dict().items() if "lora_" in k}
    res["adapter_weights_bit_exact"] = sorted(a_sd) == sorted(b_sd) and all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd)
    merged = fresh.merge_and_unload()
    res["merged_classes"] = _linear_classes(merged)
    res["merged_vs_adapter"] = _maxdiff(_logits(merged, ids), out)
    res["merged_rel"] = res["merged_vs_adapter"] / float(out.abs().max())
    return res


def trainer(work, steps=4):
    import torch
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    ids = _ids(torch, batch=8, seed=3)

    class Tiny(Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    res = {}
    for optim in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        model = _fp32(work).train()
        args = TrainingArguments(output_dir=os.path.join(work, "trainer_" + optim), optim=optim, max_steps=steps,
                                 per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], save_strategy="no",
                                 logging_steps=1, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
        tr = Trainer(model=model, args=args, train_dataset=Tiny())
        t0 = time.perf_counter()
        tr.train()
        losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
        opt = tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer
        emb = model.get_input_embeddings().weight
        layout = {}
        for name, p in model.named_parameters():
            st = opt.state.get(p, {})
            layout[name] = sorted(f"{k}:{str(v.dtype).replace('torch.', '')}:{list(v.shape)}" for k, v in st.items()
                                  if isinstance(v, torch.Tensor))
        res[optim] = {"optimizer": type(opt).__module__ + "." + type(opt).__name__, "losses": losses,
                      "train_s": time.perf_counter() - t0,
                      "embedding_state": layout["model.embed_tokens.weight"],
                      "q_proj_state": layout["model.layers.0.self_attn.q_proj.weight"],
                      "embedding_is_param": emb is model.model.embed_tokens.weight,
                      "state_layout": layout}
    return res


def write_ckpt(work, tag):
    """A 4-bit and an 8-bit checkpoint of the base model plus their logits, for the other library."""
    import torch
    ids = _ids(torch)
    res = {}
    for bits in (4, 8):
        model = _load(base(work), bits)
        path = os.path.join(work, f"ckpt{bits}_{tag}")
        model.save_pretrained(path)
        torch.save(_logits(model, ids), os.path.join(path, "logits.pt"))
        res[bits] = path
    return res


def read_ckpt(work, tag):
    """Load the checkpoints :func:`write_ckpt` wrote under ``tag`` (by the other library)."""
    import torch
    ids = _ids(torch)
    res = {}
    for bits in (4, 8):
        path = os.path.join(work, f"ckpt{bits}_{tag}")
        model = _load(path, bits)
        theirs = torch.load(os.path.join(path, "logits.pt"))
        ours = _logits(model, ids)
        res[bits] = {"classes": _linear_classes(model), "logits_diff": _maxdiff(ours, theirs),
                     "logits_rel": _maxdiff(ours, theirs) / float(theirs.abs().max())}
    return res


SCENARIOS = {"base": base, "load4": load4, "load8": load8, "save4": save4, "save8": save8, "qlora": qlora,
             "trainer": trainer}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--standin", action="store_true", help="bnbcy.install_as_bitsandbytes() first")
    ap.add_argument("--scenarios", default="load4,load8,save4,save8,qlora,trainer")
    ap.add_argument("--write-ckpt", default=None, help="tag: write checkpoints for the other library")
    ap.add_argument("--read-ckpt", default=None, help="tag: read the other library's checkpoints")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    _setup(args.standin)
    import bitsandbytes
    import importlib.metadata
    out = {"library": bitsandbytes.__file__, "bitsandbytes_version": importlib.metadata.version("bitsandbytes"),
           "scenarios": {}}
    jobs = [(s, SCENARIOS[s], ()) for s in args.scenarios.split(",") if s]
    if args.read_ckpt:
        jobs.append(("read_ckpt", read_ckpt, (args.read_ckpt,)))
    if args.write_ckpt:
        jobs.append(("write_ckpt", write_ckpt, (args.write_ckpt,)))
    for name, fn, extra in jobs:
        t0 = time.perf_counter()
        try:
            res = fn(args.work, *extra)
        except Exception as exc:  # report every scenario, not only the first failure
            res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        if isinstance(res, dict):
            res.setdefault("seconds", time.perf_counter() - t0)
        out["scenarios"][name] = res
    text = json.dumps(out, default=str)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()

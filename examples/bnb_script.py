"""A script written for bitsandbytes -- it names only ``bitsandbytes`` -- to run unchanged on bnbcy:

    BNBCY_AS_BITSANDBYTES=1 python examples/bnb_script.py

(with bnbcy installed from its wheel, which puts the start-up hook in site-packages). It
quantizes a small model to 4 and 8 bits, trains it a few steps with an 8-bit optimizer, and calls
the functional and ``torch.ops.bitsandbytes`` APIs; it prints what it measured and exits non-zero
if anything is off.
"""
import importlib.metadata

import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F

torch.manual_seed(0)
print(f"bitsandbytes {importlib.metadata.version('bitsandbytes')} from {bnb.__file__}")

# 8-bit blockwise quantization round trip
x = torch.randn(4096)
q, state = F.quantize_blockwise(x)
err = (F.dequantize_blockwise(q, state) - x).abs().max().item()
print(f"quantize_blockwise: codes {q.dtype}, max abs err {err:.4f}")
assert q.dtype == torch.uint8 and err < 0.05

# 4-bit NF4 linear layer against the float one
dense = torch.nn.Linear(128, 64)
l4 = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compute_dtype=torch.float32)
l4.load_state_dict(dense.state_dict())
l4 = l4.to("cpu")
inp = torch.randn(8, 128)
rel4 = ((l4(inp) - dense(inp)).norm() / dense(inp).norm()).item()
print(f"Linear4bit (nf4): weight {l4.weight.dtype} {tuple(l4.weight.shape)}, rel err {rel4:.4f}")
assert isinstance(l4.weight, bnb.nn.Params4bit) and rel4 < 0.15

# LLM.int8() linear layer
l8 = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False, threshold=6.0)
l8.load_state_dict(dense.state_dict())
l8 = l8.to("cpu")
rel8 = ((l8(inp.half()).float() - dense(inp)).norm() / dense(inp).norm()).item()
print(f"Linear8bitLt: weight {l8.weight.dtype}, rel err {rel8:.4f}")
assert l8.weight.dtype == torch.int8 and rel8 < 0.05

# an 8-bit optimizer fits a small regression
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
opt = bnb.optim.AdamW8bit(model.parameters(), lr=3e-3)
xs, ys = torch.randn(256, 64), torch.randn(256, 1)
losses = []
for _ in range(30):
    loss = torch.nn.functional.mse_loss(model(xs), ys)
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
st = opt.state[model[0].weight]
print(f"AdamW8bit: loss {losses[0]:.4f} -> {losses[-1]:.4f}; state1 {st['state1'].dtype}")
assert losses[-1] < 0.9 * losses[0] and st["state1"].dtype == torch.uint8

# the torch.library ops answer under bitsandbytes' namespace
ops = [n for n in dir(torch.ops.bitsandbytes) if not n.startswith("_")]
print(f"torch.ops.bitsandbytes: {len(ops)} ops {sorted(ops)[:6]}{' ...' if len(ops) > 6 else ''}")
print("ok")

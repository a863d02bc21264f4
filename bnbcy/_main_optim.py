"""The optimizer section of ``python -m bnbcy``: train a small generated model with 32-bit and
8-bit optimizers side by side and report loss, optimizer-state memory and step time."""
from __future__ import annotations

import sys
import time

import torch


def _model(width, depth, seed, device):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers).to(device)


def _data(n, width, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    w = torch.randn(width, 1, generator=g) / width ** 0.5
    y = torch.sin(x @ w * 3) + 0.1 * (x[:, :1] ** 2)
    return x.to(device), y.to(device)


def _state_bytes(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def _progress(label, i, total, loss, width=24):
    done = int(width * i / total)
    sys.stdout.write(f"\r  {label:<12} [{'#' * done}{'.' * (width - done)}] {i:>4}/{total}  loss {loss:.4f}")
    sys.stdout.flush()


def train(make_opt, label, device, steps, width, depth, batch, seed=0):
    """Train the generated regression model; returns (final loss, state bytes, params, ms per step)."""
    model = _model(width, depth, seed, device)
    x, y = _data(4096, width, seed + 1, device)
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(seed + 2)
    step_ms, loss_v = [], float("nan")
    for i in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g).to(device)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        step_ms.append((time.perf_counter() - t0) * 1e3)
        if i % max(1, steps // 20) == 0 or i == steps:
            with torch.no_grad():
                loss_v = torch.nn.functional.mse_loss(model(x), y).item()
            _progress(label, i, steps, loss_v)
    sys.stdout.write("\n")
    nparams = sum(p.numel() for p in model.parameters())
    step_ms.sort()
    return loss_v, _state_bytes(opt), nparams, step_ms[len(step_ms) // 2]


def run(device, steps=200, width=256, depth=3, batch=128):
    """Print the optimizer comparison table for ``device``."""
    import bnbcy
    runs = [
        ("torch AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
        ("AdamW32bit", lambda ps: bnbcy.optim.AdamW32bit(ps, lr=1e-3)),
        ("AdamW8bit", lambda ps: bnbcy.optim.AdamW8bit(ps, lr=1e-3, min_8bit_size=4096)),
        ("Lion8bit", lambda ps: bnbcy.optim.Lion8bit(ps, lr=3e-4)),
    ]
    print(f"\nOptimizers on a generated regression task ({device}): MLP {width}x{depth} + head, batch {batch}, "
          f"{steps} steps")
    results = [(label,) + train(make, label, device, steps, width, depth, batch) for label, make in runs]
    header = f"{'optimizer':12}  {'final loss':>10}  {'state bytes':>11}  {'bytes/param':>11}  {'step ms':>7}"
    print(header)
    print("-" * len(header))
    for label, loss, sbytes, nparams, ms in results:
        print(f"{label:12}  {loss:>10.4f}  {sbytes:>11,}  {sbytes / nparams:>11.3f}  {ms:>7.3f}")
    print("8-bit states: uint8 codes + one float32 absmax per 256 values (+ the 2 KB maps); tensors under "
          "min_8bit_size (4096) keep 32-bit states, as in bitsandbytes.")

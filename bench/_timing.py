"""Shared by the benches that time whole training steps of several set-ups of one model."""
from __future__ import annotations

import contextlib
import time


def train_step_rates(setups: dict, x, y, *, steps: int, repeats: int, precision: str = "no") -> dict[str, list[float]]:
    """images/s of ``steps`` training steps (forward, cross-entropy, backward, optimizer step) of each
    ``setups[name] = (model, optimizer)`` on the batch ``x, y``, per repeat: one untimed step each first
    (kernel selection, allocator, optimizer state), then the set-ups in turn, the order reversed every
    other repeat so that the machine's drift hits all alike."""
    import torch

    device = x.device
    names = list(setups)

    def run(name: str, n: int) -> float:
        model, opt = setups[name]
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(x) * n / (time.perf_counter() - start)

    for name in names:
        run(name, 1)
    rates = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            rates[name].append(run(name, steps))
    return rates

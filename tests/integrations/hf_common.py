"""A tiny in-memory causal-LM dataset and the reference loop the Trainer and Accelerate tests compare
with: the same batches in the same order, the same clipping, our own ``step()``."""
from __future__ import annotations

import torch

VOCAB, LENGTH, SAMPLES = 97, 16, 32


class TokenDataset(torch.utils.data.Dataset):
    """``SAMPLES`` runs of consecutive token ids from random starts (labels = inputs: the model shifts
    them): learnable in a few steps, so the loss falls."""

    def __init__(self, samples: int = SAMPLES, seed: int = 0):
        start = torch.randint(0, VOCAB - 3, (samples, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (start + torch.arange(LENGTH)) % (VOCAB - 3) + 3

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def own_loop(model, opt, sched, ids: torch.Tensor, batch: int, steps: int, max_grad_norm: float) -> list[float]:
    """Train ``steps`` steps on consecutive batches of ``ids``, as a user's own loop would; the losses."""
    losses = []
    for k in range(steps):
        x = ids[k * batch:(k + 1) * batch]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses

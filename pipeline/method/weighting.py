"""Timestep weighting of per-sample reconstruction losses (docs/method.md §3).

Step index s = 0..S-1 counts sampling steps, 0 being the first (noisiest) one.

* ``uniform``: w_s = 1.
* ``linear``:  w_s = 1 + r · (1 − s/S).
* ``focal``:   w_s = (1 − L̄_s / Σ_s' L̄_s')^r, with L̄ an EMA of the per-step loss. Each
  :meth:`TimestepWeighting.update` with a batch (step indices s_b, per-sample losses l_b) does, as the
  reference does::

      L̄ ← momentum · L̄ + (1 − momentum) · scatter_add(zeros(S), s_b, l_b)

  i.e. every entry decays once per call (also steps absent from the batch) and each step receives the
  *sum* of its samples' losses in the batch. L̄ starts at 0; before the first update (or while
  Σ L̄ = 0) focal weights are uniform (1) instead of 0/0. Steps whose loss dominates get weight → 0,
  so the optimiser cannot neglect the steps with small, but accumulating, error.

The caller (LES) updates with the batch's detached losses *before* asking for that batch's weights,
so the current batch already counts in its own weights (reference order). The EMA lives on the
device of the losses and nothing here waits for that device (no host round-trip per iteration).
"""

from __future__ import annotations

import torch

KINDS = ("uniform", "linear", "focal")


class TimestepWeighting:
    def __init__(self, kind: str, num_steps: int, r: float = 20.0, momentum: float = 0.95) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown timestep weighting {kind!r}; allowed: {', '.join(KINDS)}")
        self.kind, self.num_steps, self.r, self.momentum = kind, num_steps, r, momentum
        self.ema = torch.zeros(num_steps, dtype=torch.float64)

    def update(self, step_idx: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        if self.kind != "focal":
            return
        ema = self.ema.to(per_sample_loss.device)
        added = torch.zeros_like(ema).scatter_add_(0, step_idx.long(), per_sample_loss.detach().double())
        self.ema = self.momentum * ema + (1 - self.momentum) * added

    def weights(self, step_idx: torch.Tensor) -> torch.Tensor:
        """Per-sample weights (float32, on ``step_idx``'s device) for samples at the given step indices."""
        step_idx = step_idx.long()
        if self.kind == "linear":
            w = 1 + self.r * (1 - step_idx.double() / self.num_steps)
        elif self.kind == "focal":
            ema = self.ema.to(step_idx.device)
            total = ema.sum()
            # where, not an `if`: no host round-trip; while the EMA is all 0 the weights are 1, not 0/0
            w = torch.where(total > 0, (1 - ema[step_idx] / total) ** self.r, 1.0)
        else:
            w = torch.ones(step_idx.shape, dtype=torch.float64, device=step_idx.device)
        return w.float()


def make_weighting(kind: str, num_steps: int, r: float = 20.0, momentum: float = 0.95) -> TimestepWeighting:
    return TimestepWeighting(kind, num_steps, r, momentum)

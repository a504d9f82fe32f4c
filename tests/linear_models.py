"""A model whose loss is linear in one parameter (and, optionally, with a layer it never uses),
for the tests that its second derivative there is 0 (tests/test_measure_paths.py,
tests/test_fuzz_validate.py)."""

from __future__ import annotations

import torch
from torch import nn


class LinearInExtra(nn.Module):
    """MLP logits plus a column equal to the parameter ``extra`` (float64, seeded)."""

    def __init__(self, unused: bool = False):
        super().__init__()
        torch.manual_seed(13)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.extra = nn.Parameter(torch.tensor([0.3]))
        if unused:
            self.unused = nn.Linear(2, 2)
        self.to(torch.float64)

    def forward(self, x):
        return torch.cat([self.net(x), self.extra.expand(x.shape[0], 1)], 1)


def linear_extra_loss(out, t):
    """Cross-entropy on the logits plus 2·mean(extra column): linear in ``extra``."""
    return nn.functional.cross_entropy(out[:, :-1], t) + 2.0 * out[:, -1].mean()

"""rsl_rl's ``EmpiricalNormalization``, for timing where rsl_rl is not installed (a stand-in).

``benchmarks/bench_peers.py`` times rsl_rl's own class whenever it can import it: from
``rsl_rl.modules`` (rsl-rl-lib 5.x; that package's ``__init__`` also imports ``tensordict``),
or, where only ``tensordict`` is missing, by loading the installed
``rsl_rl/modules/normalization.py`` on its own (it imports nothing but torch). Only when
rsl-rl-lib is not installed at all does it time this class, and its rows then say
"(equivalent)".

This is a re-implementation of the same arithmetic, written from rsl-rl-lib 5.5.1's
``rsl_rl.modules.normalization.EmpiricalNormalization`` (BSD-3-Clause, ETH Zurich and NVIDIA;
the running-moments update itself comes from Chainer's ``EmpiricalNormalization``): float32
buffers of shape ``(1, *shape)`` for the mean, the variance and the std, and a long count.

- ``update(x)`` (single process, no ``until``): the batch's biased variance and mean over dim
  0, ``count += n``, ``rate = n / count``, ``mean += rate * (batch_mean - mean)``,
  ``var += rate * (batch_var - var + delta * (batch_mean - new_mean))`` and
  ``std = sqrt(var)``; nine or so small kernels, no host synchronisation.
- ``forward(x)`` (normalize): ``(x - mean) / (std + eps)``, no clip. rsl_rl's default ``eps``
  is ``1e-2``, added to the std; the benchmark passes ``1e-8`` so that its output agrees
  with the other normalizers' (which costs the same).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EmpiricalNormalization"]


class EmpiricalNormalization(nn.Module):
    """Running mean and variance of a batch stream, rsl_rl's arithmetic (see the module doc).

    Args:
        shape: feature shape of one value.
        eps: added to the std in :meth:`forward`.
    """

    def __init__(self, shape: int | tuple[int, ...], eps: float = 1e-2) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("_mean", torch.zeros(shape).unsqueeze(0))
        self.register_buffer("_var", torch.ones(shape).unsqueeze(0))
        self.register_buffer("_std", torch.ones(shape).unsqueeze(0))
        self.register_buffer("count", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize with the current statistics."""
        return (x - self._mean) / (self._std + self.eps)

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch ``(n, *shape)`` into the statistics."""
        if not self.training:
            return
        count_x = torch.tensor(x.shape[0], dtype=self.count.dtype, device=self.count.device)
        var_x = torch.var(x, dim=0, unbiased=False, keepdim=True)
        mean_x = torch.mean(x, dim=0, keepdim=True)
        self.count += count_x
        rate = count_x / self.count
        delta_mean = mean_x - self._mean
        self._mean += rate * delta_mean
        self._var += rate * (var_x - self._var + delta_mean * (mean_x - self._mean))
        self._std = torch.sqrt(self._var)

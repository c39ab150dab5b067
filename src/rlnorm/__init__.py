"""rlnorm: observation and reward normalization for reinforcement learning, done right.

Exact float64 running statistics that are NaN-proof, compile- and CUDA-graph-safe and
synchronised across ``torch.distributed`` ranks, delivered to PyTorch Lightning users as a
callback.

Example:
    >>> import torch
    >>> import rlnorm
    >>> obs_norm = rlnorm.RunningMeanStd(4)
    >>> _ = obs_norm.update(torch.randn(64, 4) * 5 + 3)
    >>> obs_norm.normalize(torch.randn(8, 4)).shape
    torch.Size([8, 4])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rlnorm._version import __version__
from rlnorm.algebra.moments import Moments
from rlnorm.stats.normalizers import NormalizerConfig, Normalizers
from rlnorm.stats.reward import RewardNormalizer
from rlnorm.stats.running_mean_std import RunningMeanStd

if TYPE_CHECKING:
    from rlnorm.io.checkpoint import load_normalizers
    from rlnorm.io.gymnasium_wrappers import from_gymnasium
    from rlnorm.io.sb3 import load_sb3_vecnormalize
    from rlnorm.lightning.callback import NormalizerCallback, get_normalizer
    from rlnorm.lightning.fabric import FabricNormalizers

__all__ = [
    "FabricNormalizers",
    "Moments",
    "NormalizerCallback",
    "NormalizerConfig",
    "Normalizers",
    "RewardNormalizer",
    "RunningMeanStd",
    "__version__",
    "from_gymnasium",
    "get_normalizer",
    "load_normalizers",
    "load_sb3_vecnormalize",
]

# The Lightning-facing names import lightning, which takes seconds: only on first use, so that
# code using the statistics alone (and every process it spawns) starts fast.
_LAZY = {
    "NormalizerCallback": "rlnorm.lightning.callback",
    "get_normalizer": "rlnorm.lightning.callback",
    "FabricNormalizers": "rlnorm.lightning.fabric",
    "load_normalizers": "rlnorm.io.checkpoint",
    "load_sb3_vecnormalize": "rlnorm.io.sb3",
    "from_gymnasium": "rlnorm.io.gymnasium_wrappers",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rlnorm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

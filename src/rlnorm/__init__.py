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

from rlnorm._version import __version__
from rlnorm.callback import NormalizerCallback, get_normalizer
from rlnorm.checkpoint import load_normalizers
from rlnorm.moments import Moments
from rlnorm.normalizers import NormalizerConfig, Normalizers
from rlnorm.reward import RewardNormalizer
from rlnorm.running_mean_std import RunningMeanStd

__all__ = [
    "Moments",
    "NormalizerCallback",
    "NormalizerConfig",
    "Normalizers",
    "RewardNormalizer",
    "RunningMeanStd",
    "__version__",
    "get_normalizer",
    "load_normalizers",
]

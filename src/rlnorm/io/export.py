"""Frozen, standalone normalizers for deployment: ``torch.export`` files that need no rlnorm.

An exported file is a ``torch.export`` program (``.pt2``): ``torch.export.load(path).module()``
gives a callable module on any machine with torch, without rlnorm installed. A program has
one input signature, fixed when it is written (``torch.export`` fixes the number of dimensions
and the dtype of its input):

- ``batched=True`` (the default): a batch ``(batch, *shape)``, any batch size (0 included),
  e.g. what a vector environment returns; ``batched=False``: one observation ``shape``, e.g.
  what ``env.reset()`` of a single environment returns.
- ``dtype``: the observations' dtype, float32 by default. A float64 program casts its input to
  float32 first, so it returns exactly what the float32 program returns for ``obs.float()``
  (the statistics and the policy are float32). Other inputs are refused by torch's own checks.

Example:
    >>> import torch
    >>> from rlnorm import RunningMeanStd
    >>> from rlnorm.io.export import FrozenNormalizer
    >>> rms = RunningMeanStd(2)
    >>> _ = rms.update(torch.tensor([[0.0, 10.0], [2.0, 30.0]]))
    >>> frozen = FrozenNormalizer.from_running(rms)
    >>> frozen(torch.tensor([[1.0, 30.0]])).round(decimals=4).tolist()
    [[0.0, 1.0]]
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from rlnorm import _validation as check
from rlnorm.algebra.affine import affine as normalize_map
from rlnorm.stats.normalizers import Normalizers
from rlnorm.stats.running_mean_std import RunningMeanStd

__all__ = [
    "EXPORT_DTYPES",
    "AsFloat32",
    "DictNormalizer",
    "FrozenNormalizer",
    "export_module",
    "export_observation_normalizer",
    "export_policy",
    "fold_into_linear",
]


class FrozenNormalizer(nn.Module):
    """``clamp(((obs - offset) - offset_lo) * scale, -clip, clip)`` with float32 constants.

    The same float32 formula as :meth:`RunningMeanStd.normalize`, so deployed policies see
    bitwise the normalized observations they were trained on.

    Args:
        offset: subtracted first (the running mean, or zeros for scale-only normalizers).
        scale: ``1 / sqrt(var + epsilon)``.
        clip: clamp bound; ``math.inf`` for none.
        offset_lo: the part of the mean that ``offset`` in float32 leaves out (zeros if
            ``None``).
    """

    def __init__(
        self, offset: Tensor, scale: Tensor, clip: float, offset_lo: Tensor | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("offset", offset.detach().to(torch.float32).clone())
        lo = torch.zeros_like(self.offset) if offset_lo is None else offset_lo.detach()
        self.register_buffer("offset_lo", lo.to(torch.float32).clone())
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        self.clip = float(clip)

    @classmethod
    def from_running(cls, rms: RunningMeanStd) -> FrozenNormalizer:
        """Freeze a :class:`~rlnorm.RunningMeanStd` as it is now (identity before any data)."""
        seen = bool(rms.weight_sum > 0)
        affine = normalize_map(rms.moments, rms.clip, rms.epsilon, rms.center, torch.float32)
        clip = rms.clip if (seen and rms.clip is not None) else math.inf
        return cls(affine.offset.cpu(), affine.scale.cpu(), clip, affine.offset_lo.cpu())

    def forward(self, obs: Tensor) -> Tensor:
        """Normalize ``obs`` of shape ``(*batch, *shape)``."""
        y = ((obs.to(torch.float32) - self.offset) - self.offset_lo) * self.scale
        return y.clamp(-self.clip, self.clip)


class DictNormalizer(nn.Module):
    """Frozen normalizers of dict observations; keys without a normalizer pass through."""

    def __init__(self, normalizers: dict[str, FrozenNormalizer]) -> None:
        super().__init__()
        self.normalizers = nn.ModuleDict(normalizers)

    def forward(self, obs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Normalize each entry that has a normalizer."""
        out: dict[str, Tensor] = {}
        for key, value in obs.items():
            out[key] = value
        for key, norm in self.normalizers.items():
            out[key] = norm(obs[key])
        return out


class AsFloat32(nn.Module):
    """Casts its input to float32 (the first step of programs that take float64 input)."""

    def forward(self, obs: Tensor) -> Tensor:
        """``obs.to(torch.float32)``."""
        return obs.to(torch.float32)


#: Input dtypes an exported program can take.
EXPORT_DTYPES = (torch.float32, torch.float64)


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in EXPORT_DTYPES:
        raise ValueError(
            f"`dtype` must be torch.float32 or torch.float64 (the observations' dtype), got "
            f"{dtype!r}."
        )
    return dtype


def export_module(
    module: nn.Module,
    example: Tensor | dict[str, Tensor],
    path: str | os.PathLike[str],
    *,
    batched: bool = True,
) -> None:
    """Save ``module`` as a ``torch.export`` program.

    Args:
        module: the module to export (put in eval mode).
        example: an example input (or a dict of them) with the dtype and number of dimensions
            the program will take: ``(batch, *shape)`` if ``batched``, else ``shape``.
        path: file to write (``.pt2`` by convention).
        batched: the leading dimension of the input is a batch of any size; otherwise the
            input's shape is fixed to the example's.
    """
    dynamic: Any = None
    if batched:
        batch = {0: torch.export.Dim.DYNAMIC}
        dynamic = ({k: batch for k in example} if isinstance(example, dict) else batch,)
    program = torch.export.export(module.eval(), (example,), dynamic_shapes=dynamic)
    torch.export.save(program, os.fspath(path))


def export_observation_normalizer(
    norms: Normalizers,
    path: str | os.PathLike[str],
    *,
    batched: bool = True,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Write the frozen observation normalizer(s) to ``path`` (see the module docstring).

    Args:
        norms: normalizers, e.g. from :func:`rlnorm.load_normalizers`.
        path: file to write.
        batched: the program takes a batch ``(batch, *shape)`` of any size; ``False``: one
            observation of shape ``shape``.
        dtype: dtype of the observations the program takes, ``torch.float32`` or
            ``torch.float64`` (cast to float32 first).

    Returns:
        The frozen module that was exported.

    Raises:
        ValueError: there is no observation normalizer yet (no data was ever seen), or an
            unsupported ``dtype``.
    """
    check.check_instance("norms", norms, Normalizers)
    _check_dtype(dtype)
    if not norms.obs:
        raise ValueError("There is no observation normalizer to export (no data was seen).")
    frozen = {key: FrozenNormalizer.from_running(rms) for key, rms in norms.obs.items()}
    lead = (2,) if batched else ()
    examples = {key: torch.zeros(*lead, *rms.shape, dtype=dtype) for key, rms in norms.obs.items()}
    if norms.dict_obs:
        module: nn.Module = DictNormalizer(frozen)
        export_module(module, examples, path, batched=batched)
    else:
        module = next(iter(frozen.values()))
        export_module(module, next(iter(examples.values())), path, batched=batched)
    return module


def export_policy(
    policy: nn.Module,
    obs_dim: int,
    path: str | os.PathLike[str],
    *,
    batched: bool = True,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Write a float32 policy on flat observations as a program (see the module docstring).

    Args:
        policy: maps float32 observations ``(..., obs_dim)`` to its output, e.g. an actor
            whose first layer came from :func:`fold_into_linear`.
        obs_dim: features of one observation.
        path: file to write.
        batched: the program takes ``(batch, obs_dim)``; ``False``: one observation
            ``(obs_dim,)``.
        dtype: dtype of the observations the program takes (float64 is cast to float32).

    Returns:
        The module that was exported (``policy`` after an input cast).
    """
    _check_dtype(dtype)
    module = nn.Sequential(AsFloat32(), policy).eval()
    lead = (2,) if batched else ()
    export_module(module, torch.zeros(*lead, obs_dim, dtype=dtype), path, batched=batched)
    return module


@torch.no_grad()
def fold_into_linear(linear: nn.Linear, rms: RunningMeanStd) -> nn.Linear:
    """A copy of ``linear`` that takes raw observations: ``linear(normalize(x))`` without clipping.

    ``W' = W * scale`` and ``b' = b - W' @ offset``. Clipping cannot be folded into a linear
    layer: the result equals the original wherever no observation would have been clipped.

    Args:
        linear: the policy's first layer, fed normalized observations.
        rms: the observation normalizer (1-D ``shape`` matching ``linear.in_features``).

    Returns:
        A new ``nn.Linear``.
    """
    check.check_instance("linear", linear, nn.Linear, "torch.nn.Linear")
    check.check_instance("rms", rms, RunningMeanStd)
    frozen = FrozenNormalizer.from_running(rms)
    if frozen.scale.shape != (linear.in_features,):
        raise ValueError(
            f"`rms` has shape {tuple(frozen.scale.shape)} but `linear` takes "
            f"{linear.in_features} features."
        )
    scale = frozen.scale.to(linear.weight)
    offset = (frozen.offset.double() + frozen.offset_lo.double()).to(linear.weight)
    folded = nn.Linear(linear.in_features, linear.out_features, bias=True).to(linear.weight)
    folded.weight.copy_(linear.weight * scale)
    bias = linear.bias if linear.bias is not None else torch.zeros_like(folded.bias)
    folded.bias.copy_(bias - folded.weight @ offset)
    return folded

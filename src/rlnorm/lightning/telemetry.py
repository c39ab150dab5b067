"""Drift telemetry: what is logged about a set of normalizers, when, and what a checkpoint keeps.

:class:`DriftTelemetry` holds everything the logged figures depend on besides the statistics
themselves: the open interval of batch shifts and clip fractions per statistic
(:class:`~rlnorm.lightning.interval.IntervalMetrics`), the statistics, step and counts of the
last log, and the drift heatmaps (:class:`~rlnorm.lightning.heatmap.DriftHeatmap`). It computes
the figures of one log with the pure functions of :mod:`rlnorm.algebra.drift` and writes them.

It does not know the ``Trainer``: it takes the loggers, the step, whether this process is rank
zero and the collectives it needs, so that :class:`~rlnorm.NormalizerCallback` and a Lightning
Fabric loop (``fabric.loggers``, ``fabric.is_global_zero``, ``fabric.all_gather``) share it.
Scalars go to every logger through ``log_metrics``; histograms and images need a
``SummaryWriter`` and are written only to TensorBoard loggers (Trainer's or Fabric's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.fabric.loggers import Logger, TensorBoardLogger
from torch import Tensor

from rlnorm import _validation as check
from rlnorm.algebra.drift import drift, per_dim_drift, summary
from rlnorm.algebra.moments import Moments
from rlnorm.backends.dispatch import drift_batch_shift
from rlnorm.lightning.heatmap import DriftHeatmap
from rlnorm.lightning.interval import IntervalMetrics
from rlnorm.stats.normalizers import TENSOR_KEY, Normalizers
from rlnorm.stats.running_mean_std import RunningMeanStd

__all__ = ["DriftHeatmap", "DriftTelemetry", "IntervalMetrics", "check_name", "tensorboard_writers"]


def check_name(name: Any) -> str:
    """A name that prefixes logged tags: a non-empty ``str`` without whitespace.

    Example:
        >>> check_name("policy")
        'policy'
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a str, got {name!r}.")
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"`name` must be a non-empty string without spaces, got {name!r}.")
    return name


def tensorboard_writers(loggers: Iterable[Logger]) -> list[Any]:
    """The ``SummaryWriter`` of each TensorBoard logger among ``loggers`` (Trainer's or Fabric's).

    Call it on rank zero only: elsewhere a logger's ``experiment`` is a stand-in.

    Example:
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> tensorboard_writers([CSVLogger("logs")])
        []
    """
    return [logger.experiment for logger in loggers if isinstance(logger, TensorBoardLogger)]


class DriftTelemetry:
    """The drift telemetry of one set of normalizers, shared by the callback and Fabric loops.

    Record what each update and normalize call returned (``record_*``), then :meth:`log` at the
    steps of your choice: every statistic's summary (count, mean, std extremes), its drift since
    the last log (mean, log-std, KL), the interval's largest batch shift and clip fraction, the
    non-finite rows skipped, and with TensorBoard histograms and a drift heatmap. Tags are
    ``<name>/obs/...`` (``<name>/obs/<key>/...`` for dict observations) and
    ``<name>/reward/...``. :meth:`state_dict` and :meth:`load_state_dict` carry all of it across
    a checkpoint, so a resumed run logs exactly what an uninterrupted one logs.

    Across ranks: :meth:`log` and :meth:`log_if_changed` are collectives (the interval
    figures are reduced over ``torch.distributed``): call them on every rank at the same steps.
    Only the process with ``is_global_zero=True`` writes.

    Args:
        normalizers: the statistics reported on (keep calling ``record_*`` with what their
            update and normalize calls return).
        name: prefix of every tag.
        histograms: also write histograms of the per-dimension mean and std and the drift
            heatmap image to TensorBoard loggers.
        sync: reduce the interval figures over ``torch.distributed`` (``False``: this
            process's own, with no collective; for a process that updates alone), over the
            normalizers' ``process_group``.

    Example:
        >>> import rlnorm
        >>> norms = rlnorm.Normalizers(rlnorm.NormalizerConfig(obs_shape=3))
        >>> telemetry = DriftTelemetry(norms, name="policy")
        >>> telemetry.record_obs_update(norms.update_obs(torch.randn(64, 3)))
        >>> figures = telemetry.log(fabric.loggers, step=0)  # doctest: +SKIP
        >>> sorted(telemetry.log([], step=0))[:2]
        ['policy/obs/batch_shift', 'policy/obs/count']
    """

    def __init__(
        self,
        normalizers: Normalizers,
        *,
        name: str = "rlnorm",
        histograms: bool = True,
        sync: bool = True,
    ) -> None:
        self.normalizers: Normalizers = check.check_instance(
            "normalizers", normalizers, Normalizers
        )
        self.name = check_name(name)
        self.histograms = check.check_bool("histograms", histograms)
        self.sync = check.check_bool("sync", sync)
        # The open interval per tag: its metrics, or its partials (`_pending_interval`) until
        # the metrics are rebuilt on the statistics' device at first use.
        self._interval: dict[str, IntervalMetrics] = {}
        self._pending_interval: dict[str, Tensor] = {}
        # The statistics, step and (samples, non-finite rows) counts of the last log.
        self._last_logged: dict[str, Moments] = {}
        self._last_logged_step: int | None = None
        self._logged_counts: dict[str, tuple[int, int]] = {}
        self._heatmaps: dict[str, DriftHeatmap] = {}
        # `tensor_obs`: (normalizers, their tensor normalizer, its interval), while they hold.
        self._tensor_obs: tuple[Normalizers, RunningMeanStd, IntervalMetrics] | None = None

    # ------------------------------------------------------------------ recording

    def record_obs_update(self, batches: Mapping[str, Moments]) -> None:
        """Record the batch shift of one update (what ``Normalizers.update_obs`` returned)."""
        norms = self.normalizers
        for key, batch in batches.items():
            shift = drift_batch_shift(batch, norms.obs[key].moments)
            self._metrics(norms.obs_tag(key)).update_shift(shift)

    def record_obs_clipped(self, counts: Mapping[str, tuple[int | Tensor, int]]) -> None:
        """Record the counts ``Normalizers.normalize_obs_counting_clipped`` returns."""
        for key, (clipped, values) in counts.items():
            self.record_clipped(key, clipped, values)

    def record_clipped(self, key: str, clipped: int | Tensor, values: int) -> None:
        """Record that ``clipped`` of ``values`` observations of normalizer ``key`` sat at ±clip.

        Args:
            key: the observation normalizer's key (``"obs"`` for tensor observations).
            clipped: how many values sat at the clamp bound (an int, or a 0-d tensor).
            values: how many values were normalized.
        """
        self._metrics(self.normalizers.obs_tag(key)).add_clipped(clipped, values)

    def tensor_obs(self) -> tuple[RunningMeanStd, IntervalMetrics]:
        """The normalizer of tensor observations and the interval its clipped counts go to.

        What the per-step ``normalize_obs`` of a rollout needs, looked up once: there each
        Python call costs about a microsecond, more than the kernel. Recording into the
        interval (``add_clipped``) is :meth:`record_clipped` for the tensor normalizer.
        """
        cached = self._tensor_obs
        norms = self.normalizers
        if cached is None or cached[0] is not norms:
            cached = self._tensor_obs = (norms, norms.obs[TENSOR_KEY], self._metrics("obs"))
        return cached[1], cached[2]

    def record_reward_update(self, batch: Moments | None) -> None:
        """Record the batch shift of one reward update (``Normalizers.update_rewards``'s result)."""
        reward = self.normalizers.reward
        if batch is not None and reward is not None:
            self._metrics("reward").update_shift(drift_batch_shift(batch, reward.stats.moments))

    def record_reward_clipped(self, clipped: int | Tensor, values: int) -> None:
        """Record that ``clipped`` of ``values`` scaled rewards sat at ``+-reward_clip``.

        Args:
            clipped: what ``Normalizers.scale_rewards(..., return_clipped=True)`` counted (an
                int, or a 0-d tensor).
            values: how many rewards were scaled.
        """
        self._metrics("reward").add_clipped(clipped, values)

    def normalizers_moved(self) -> None:
        """Follow the normalizers to their device: call after moving them (``.to(device)``)."""
        device = self.normalizers.device
        # The open interval carries over; its metrics are rebuilt on the device at first use.
        for tag, metrics in self._interval.items():
            self._pending_interval[tag] = metrics.partials().cpu()
        self._interval.clear()
        self._tensor_obs = None
        self._last_logged = {tag: _to(m, device) for tag, m in self._last_logged.items()}

    # ------------------------------------------------------------------ logging

    def log(
        self,
        loggers: Sequence[Logger],
        step: int,
        *,
        is_global_zero: bool = True,
        final: bool = False,
    ) -> dict[str, float]:
        """Compute every figure (a collective: call it on every rank) and write them.

        Args:
            loggers: where the figures go (Trainer's or Fabric's loggers).
            step: the step to log at.
            is_global_zero: whether this process writes (only rank zero does).
            final: the point logged where the run ends: it reads the figures without starting
                a new interval, so that a run resumed from a checkpoint written now logs what
                an uninterrupted run logs.

        Returns:
            The scalar figures by tag (those without data in the interval left out).
        """
        metrics: dict[str, float] = {}
        histograms: dict[str, Tensor] = {}
        images: dict[str, Tensor] = {}
        for tag, norm in self.normalizers.named_normalizers().items():
            prefix = f"{self.name}/{tag}"
            state = _clone(norm.moments)
            figures = summary(state)
            last = self._last_logged.get(tag)
            if last is not None and last.mean.shape == state.mean.shape:
                figures.update(drift(last, state))
                heatmap = self._heatmaps.setdefault(tag, DriftHeatmap())
                column = per_dim_drift(last, state)
                if final:
                    image = heatmap.image(extra=column)
                else:
                    heatmap.add(column)
                    image = heatmap.image()
                if image is not None:
                    images[f"{prefix}/drift_heatmap"] = image
            figures.update(self._metrics(tag).compute(reset=not final))
            figures["nonfinite_rows"] = norm.nonfinite_count
            if not final:
                self._last_logged[tag] = state
            for key, value in figures.items():
                value = float(value)
                if value == value:  # NaN: no data in this interval
                    metrics[f"{prefix}/{key}"] = value
            histograms[f"{prefix}/mean"] = state.mean.reshape(-1)
            histograms[f"{prefix}/std"] = state.var.sqrt().reshape(-1)
        if not final:
            self._last_logged_step = step
            self._logged_counts = self._counts()
        if is_global_zero:
            self._write(loggers, step, metrics, histograms, images)
        return metrics

    def log_if_changed(
        self,
        loggers: Sequence[Logger],
        step: int,
        *,
        is_global_zero: bool = True,
        final: bool = False,
        any_rank: Callable[[bool], bool] | None = None,
    ) -> bool:
        """:meth:`log` if the statistics changed since the last log, and not twice at a step.

        The decision rests on replicated facts (the step, and the counts, agreed over the ranks
        in case they are not synced) because logging runs collectives on every rank.

        Args:
            loggers: as for :meth:`log`; none: nothing is logged.
            step: as for :meth:`log`; negative (no step taken yet): nothing is logged.
            is_global_zero: as for :meth:`log`.
            final: as for :meth:`log`.
            any_rank: whether a decision holds on any rank (a collective), e.g.
                ``lambda d: fabric.strategy.reduce_boolean_decision(d, all=False)``; ``None``
                for a single process.

        Returns:
            Whether it logged.
        """
        if not loggers or step < 0 or step == self._last_logged_step:
            return False
        counts = self._counts()
        changed = any(counts[tag] != self._logged_counts.get(tag, (0, 0)) for tag in counts)
        if any_rank is not None:
            changed = any_rank(changed)
        if changed:
            self.log(loggers, step, is_global_zero=is_global_zero, final=final)
        return changed

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, all_gather: Callable[[Tensor], Tensor] | None = None) -> dict[str, Any]:
        """The state to checkpoint: ``last_logged`` and ``telemetry`` entries of a normalizer state.

        Args:
            all_gather: every rank's tensor stacked along a new first dim (a collective, e.g.
                ``fabric.all_gather``): the open interval saved is then that of all ranks
                together, which one rank resumes. ``None``: this rank's own, no collective.
        """
        interval = dict(self._pending_interval)
        interval.update({tag: m.partials().cpu() for tag, m in self._interval.items()})
        tags = sorted(self.normalizers.named_normalizers())
        if all_gather is not None and tags:
            local = torch.stack([self._metrics(tag).partials() for tag in tags])
            reduced = IntervalMetrics.sum_over_ranks(all_gather(local)).cpu()
            interval = dict(zip(tags, reduced.unbind(0), strict=True))
        return {
            "last_logged": {tag: m._asdict() for tag, m in self._last_logged.items()},
            "telemetry": {
                "last_logged_step": self._last_logged_step,
                "logged_counts": {tag: list(c) for tag, c in self._logged_counts.items()},
                "interval": interval,
                "heatmaps": {tag: h.state_dict() for tag, h in self._heatmaps.items()},
            },
        }

    def load_state_dict(self, state: Mapping[str, Any], *, is_global_zero: bool = True) -> None:
        """Restore :meth:`state_dict` (after the normalizers' statistics are restored).

        States written before the ``telemetry`` entry existed resume from what they imply.

        Args:
            state: a normalizer state holding ``last_logged`` and ``telemetry`` entries.
            is_global_zero: whether this process resumes the saved open interval (the sum over
                all ranks: only one rank may resume it).
        """
        device = self.normalizers.device
        self._last_logged = {
            tag: _to(Moments(**m), device) for tag, m in state.get("last_logged", {}).items()
        }
        self._interval.clear()
        self._tensor_obs = None
        self._pending_interval = {}
        self._heatmaps = {}
        telemetry = state.get("telemetry")
        if telemetry is None:  # an older checkpoint: what it implies
            self._last_logged_step = None
            nonfinite = {tag: c[1] for tag, c in self._counts().items()}
            self._logged_counts = {
                tag: (int(m.count), nonfinite.get(tag, 0)) for tag, m in self._last_logged.items()
            }
            return
        step = telemetry.get("last_logged_step")
        self._last_logged_step = None if step is None else int(step)
        self._logged_counts = {
            tag: (int(c[0]), int(c[1])) for tag, c in telemetry.get("logged_counts", {}).items()
        }
        if is_global_zero:
            self._pending_interval = {
                tag: t.detach().cpu() for tag, t in telemetry.get("interval", {}).items()
            }
        for tag, columns in telemetry.get("heatmaps", {}).items():
            heatmap = self._heatmaps[tag] = DriftHeatmap()
            heatmap.load_state_dict(columns)

    # ------------------------------------------------------------------ internals

    def _metrics(self, tag: str) -> IntervalMetrics:
        metrics = self._interval.get(tag)
        if metrics is None:
            device = self.normalizers.named_normalizers()[tag].mean.device
            group = self.normalizers.process_group
            metrics = self._interval[tag] = IntervalMetrics(device, self.sync, group)
            pending = self._pending_interval.pop(tag, None)
            if pending is not None:
                metrics.load_partials(pending)
        return metrics

    def _counts(self) -> dict[str, tuple[int, int]]:
        """Samples and non-finite rows seen per statistic: equal on every rank when synced."""
        return {
            tag: (int(norm.moments.count), int(norm.nonfinite_count))
            for tag, norm in self.normalizers.named_normalizers().items()
        }

    def _write(
        self,
        loggers: Sequence[Logger],
        step: int,
        metrics: dict[str, float],
        histograms: dict[str, Tensor],
        images: dict[str, Tensor],
    ) -> None:
        for logger in loggers:
            logger.log_metrics(metrics, step=step)
        if not self.histograms:
            return
        for writer in tensorboard_writers(loggers):
            for tag, values in histograms.items():
                if values.numel():
                    writer.add_histogram(f"{tag}_hist", values.detach().cpu(), global_step=step)
            for tag, image in images.items():
                writer.add_image(tag, image, global_step=step, dataformats="CHW")


def _clone(moments: Moments) -> Moments:
    return Moments(*(None if t is None else t.detach().clone() for t in moments))


def _to(moments: Moments, device: torch.device | None) -> Moments:
    return Moments(*(None if t is None else t.to(device) for t in moments))

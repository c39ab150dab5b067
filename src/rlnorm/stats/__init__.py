"""The statistics as ``nn.Module`` objects, their distributed reduction and checkpoint schema.

``RunningMeanStd``, ``RewardNormalizer`` and ``Normalizers`` live here, with no Lightning,
torchmetrics or gymnasium import: evaluation and deployment code loads this layer alone.
"""

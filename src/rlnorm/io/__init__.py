"""Statistics in and out of files: checkpoints, ``torch.export`` programs, SB3/Gymnasium.

- :mod:`~rlnorm.io.checkpoint`: :func:`~rlnorm.load_normalizers` and checkpoint reading.
- :mod:`~rlnorm.io.export`: frozen normalizers as ``torch.export`` programs, folding.
- :mod:`~rlnorm.io.sb3`: Stable-Baselines3 ``VecNormalize`` files, read through
  :mod:`~rlnorm.io.unpickler`, the restricted unpickler.
- :mod:`~rlnorm.io.gymnasium_wrappers`: live Gymnasium normalization wrappers.
- :mod:`~rlnorm.io.convert`: other libraries' mean/var/count into normalizers.

No Lightning, torchmetrics or gymnasium import: reading a checkpoint for deployment does not
load the training stack.
"""

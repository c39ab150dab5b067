"""Statistics in and out of files: checkpoints, ``torch.export`` programs, SB3/Gymnasium.

No Lightning, torchmetrics or gymnasium import: reading a checkpoint for deployment does not
load the training stack.
"""

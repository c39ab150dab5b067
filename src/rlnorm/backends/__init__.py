"""How the statistics are computed: torch operations, native CPU kernels, CUDA graphs.

Backends take and return plain tensors; they never see a module. The statistics modules go
through one door, :mod:`rlnorm.backends.dispatch`, which picks the path for each call.
"""

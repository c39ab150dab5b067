"""Pure functions over tensors: batch moments, exact and EMA merges, drift figures.

The lowest layer: no modules, no state, no devices chosen, no collectives; everything above
(the execution backends, the statistics modules, the Lightning integration) is built on it.
"""

"""Replays of CUDA graphs for eager ``update`` and ``normalize`` calls on CUDA.

An eager update on a GPU launches about a hundred tiny kernels and costs 1-2 ms of launch
overhead whatever the batch size; a normalize about twenty. Replaying a CUDA graph of the same
work costs one launch. So, for eager CUDA calls, :class:`GraphedCalls` runs the first call of
each input signature (shape, dtype, settings) normally on a side stream (the warm-up CUDA
graphs need), captures the second, and from then on copies the inputs into the graph's static
buffers, replays, and returns a copy of the outputs: three launches per call. Where the fused
Triton kernels serve (:mod:`rlnorm.backends.fused`), the graph holds them instead of the torch
code: three kernels for an update, one for a normalize.

The graphs apply only where they are exact drop-ins: not under ``torch.compile`` or inside a
capture of the caller's own, no autograd through the input, no distributed reduction and no
``nonfinite="raise"`` (both need the host). Each module keeps at most a few signatures; others
run eagerly. Set ``RLNORM_CUDA_GRAPHS=0`` (or use :func:`use_graphs`) to turn the graphs off.
If a capture fails, the module warns once and runs eagerly from then on.

Memory: a graph keeps static copies of its inputs and its intermediates alive (for a
(16384, 256) float32 batch, a few tens of MB) for as long as the module keeps the signature.

Example:
    >>> from rlnorm.backends.cuda_graphs import graphs_enabled
    >>> isinstance(graphs_enabled(), bool)
    True
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["GraphedCalls", "graphs_enabled", "use_graphs"]

#: Signatures each module keeps graphs for; beyond them, calls run eagerly.
MAX_SIGNATURES = 4

_enabled = os.environ.get("RLNORM_CUDA_GRAPHS", "1") != "0"


def graphs_enabled() -> bool:
    """Whether eager CUDA calls may be replayed from CUDA graphs (``RLNORM_CUDA_GRAPHS``)."""
    return _enabled


@contextlib.contextmanager
def use_graphs(on: bool) -> Iterator[None]:
    """Allow or forbid the automatic CUDA graphs inside a ``with`` block (tests, benchmarks).

    Args:
        on: whether eligible CUDA calls may replay graphs.
    """
    global _enabled
    previous = _enabled
    _enabled = bool(on)
    try:
        yield
    finally:
        _enabled = previous


def eligible(x: Tensor) -> bool:
    """Whether a call on ``x`` may take a graph (static facts only)."""
    return (
        x.is_cuda
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.cuda.is_current_stream_capturing()
        and _enabled
    )


class _Graph:
    """One captured call: its graph, static inputs and static outputs."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[Tensor | None], outputs: Any):
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs


class GraphedCalls:
    """CUDA graphs of one function, per input signature, owned by one module.

    Args:
        name: what the function is, for the warning if a capture fails.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._warmed: set[Hashable] = set()
        self._stream: torch.cuda.Stream | None = None
        self._failed = False
        # Identity and address of the state tensors the graphs were captured with.
        self._state: tuple[tuple[int, int], ...] = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphedCalls:
        return GraphedCalls(self.name)  # graphs belong to the original's buffers

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"])  # type: ignore[misc]

    def clear(self) -> None:
        """Forget every graph (the module's buffers moved or were replaced)."""
        self._graphs.clear()
        self._warmed.clear()
        self._stream = None

    def __call__(
        self,
        key: Hashable,
        fn: Callable[..., Any],
        inputs: Sequence[Tensor | None],
        copy_out: Callable[[Any], Any],
        state: Sequence[Tensor] = (),
    ) -> Any:
        """``fn(*inputs)``, from a graph when one is (or can now be) captured for ``key``.

        Args:
            key: everything the captured work depends on besides the input values.
            fn: the eager function; it must only read ``inputs`` and the module's buffers.
            inputs: CUDA tensors (or ``None``) passed to ``fn``.
            copy_out: turns the graph's static outputs into fresh tensors for the caller.
            state: the module tensors ``fn`` reads or writes in place (its buffers). Graphs
                hold their addresses, so if any was replaced since the capture, every graph
                is dropped and captured afresh.

        Returns:
            What ``fn`` returns: its own outputs when it ran eagerly, ``copy_out`` of the
            graph's outputs when replayed.
        """
        addresses = tuple((id(t), t.data_ptr()) for t in state)
        if addresses != self._state:
            self.clear()
            self._state = addresses
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            for static, value in zip(entry.inputs, inputs, strict=True):
                if static is not None:
                    static.copy_(value)  # type: ignore[arg-type]
            entry.graph.replay()
            return copy_out(entry.outputs)
        if self._failed or len(self._graphs) >= MAX_SIGNATURES:
            return fn(*inputs)
        stream = self._side_stream(inputs)
        current = torch.cuda.current_stream()
        stream.wait_stream(current)
        if key not in self._warmed:
            # The warm-up CUDA graphs need (lazy handles and workspaces on the capture stream)
            # is this call itself, run eagerly on the stream the capture will use, on copies
            # laid out as the capture's static inputs will be: kernels specialised by layout
            # (Triton's, by pointer alignment and strides) are then compiled before the
            # capture, which cannot load new ones. A sliced input is the case this covers.
            with torch.cuda.stream(stream):
                out = fn(*[None if t is None else t.clone() for t in inputs])
            current.wait_stream(stream)
            self._warmed.add(key)
            return out
        try:
            static = [None if t is None else t.clone() for t in inputs]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                outputs = fn(*static)
        except Exception as err:  # any capture failure: fall back to eager, never break
            self._failed = True
            self._graphs.clear()
            current.wait_stream(stream)
            warnings.warn(
                f"rlnorm: capturing `{self.name}` in a CUDA graph failed ({err!r}); it runs "
                "eagerly from now on. Set RLNORM_CUDA_GRAPHS=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
            return fn(*inputs)
        current.wait_stream(stream)
        self._graphs[key] = _Graph(graph, static, outputs)
        graph.replay()  # the capture ran nothing: this call's work happens now
        return copy_out(outputs)

    def _side_stream(self, inputs: Sequence[Tensor | None]) -> torch.cuda.Stream:
        if self._stream is None:
            device = next(t.device for t in inputs if t is not None)
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

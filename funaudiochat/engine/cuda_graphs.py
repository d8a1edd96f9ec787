"""Decode steps replayed as CUDA graphs: one kernel launch per step instead of thousands.

On a GPU a batch-1 decode step is bound by launching kernels from Python, not by the GPU (BENCHMARKS.md: the 8B's
compiled S2T step took 7.4 ms where reading its weights takes 3.4). `GraphedStep` records the kernels of one step
function once per input signature (shapes, dtypes, the constant arguments, and the addresses of the tensors it
updates in place), then replays them: every call copies its per-step inputs into the graph's static input buffers,
replays, and returns copies of the static outputs.

Which tensors a step updates in place (KV caches, key masks) is named by the caller: those are read and written
at their own addresses, so the address is part of the signature: a new `DecodeState`, whose caches are new tensors,
records its own graph (or reuses one whose caches the allocator placed at the same addresses). At most
`max_graphs` graphs are kept (least recently used first out); each holds its own memory pool, freed with it.

The step function must not synchronise with the host (no `.item()`, no shapes that depend on values): the compiled
decode steps (engine/compiled.py) are written that way for torch.compile already. On CPU, `GraphedStep(...,
record=replay_by_call)` stands in for the graph with a call on the static buffers, so the buffer bookkeeping is
tested on machines without a GPU.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


@dataclass
class _Recording:
    replay: Callable[[], None]
    inputs: dict[int, torch.Tensor]  # flattened argument index -> static buffer, refreshed before each replay
    outputs: Any          # the step's outputs, rewritten by each replay


def record_cuda_graph(fn: Callable, args: tuple) -> tuple[Callable[[], None], Any, Any]:
    """Run `fn(*args)` once for real on a side stream (the warm-up CUDA graphs need: lazy initialisation, compiled
    kernels loaded) and record its kernels -> (replay, the recorded outputs, the warm-up's outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run: the caches are not written a second time
        outputs = fn(*args)
    return graph.replay, outputs, result


def replay_by_call(fn: Callable, args: tuple) -> tuple[Callable[[], None], Any, Any]:
    """The CPU stand-in for `record_cuda_graph`: a replay calls `fn` on the same (static) arguments and writes its
    outputs into the first call's output tensors, as a graph's replay rewrites its static outputs."""
    outputs = fn(*args)

    def replay():
        new = tree_flatten(fn(*args))[0]
        for old, value in zip(tree_flatten(outputs)[0], new):
            if isinstance(old, torch.Tensor):
                old.copy_(value)
    return replay, outputs, tree_map(_copy, outputs)


class GraphedStep:
    """`fn` replayed from recorded graphs; `in_place` names its arguments (tensors, or lists / tuples of them) that it
    updates in place and that are used at their own addresses."""

    def __init__(self, fn: Callable, in_place: tuple[str, ...], max_graphs: int = 8,
                 record: Callable = record_cuda_graph):
        self.fn, self.in_place, self.max_graphs, self.record = fn, frozenset(in_place), max_graphs, record
        self.signature = inspect.signature(fn)
        unknown = self.in_place - set(self.signature.parameters)
        if unknown:
            raise ValueError(f"{getattr(fn, '__name__', fn)} has no argument(s) {sorted(unknown)}")
        self.recordings: OrderedDict[tuple, _Recording] = OrderedDict()
        self.recorded = 0  # graphs recorded so far (a new signature, or one evicted and seen again)

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        leaves, spec = tree_flatten(tuple(bound.arguments.values()))
        in_place, start = set(), 0
        for name, arg_spec in zip(bound.arguments, spec.children()):  # each argument's leaves, in order
            if name in self.in_place:
                in_place.update(range(start, start + arg_spec.num_leaves))
            start += arg_spec.num_leaves
        key = (spec, tuple(_signature_of(leaf, i in in_place) for i, leaf in enumerate(leaves)))
        recording = self.recordings.get(key)
        if recording is None:
            return self._record(key, leaves, spec, in_place)
        self.recordings.move_to_end(key)
        for i, buffer in recording.inputs.items():
            buffer.copy_(leaves[i])
        recording.replay()
        return tree_map(_copy, recording.outputs)

    def _record(self, key, leaves: list, spec, in_place: set):
        # (the in-place tensors are not kept: once freed, a later state's caches may take their addresses, and
        # then this recording serves them)
        inputs = {i: leaf.clone() for i, leaf in enumerate(leaves)
                  if isinstance(leaf, torch.Tensor) and i not in in_place}
        args = [inputs.get(i, leaf) for i, leaf in enumerate(leaves)]
        replay, outputs, result = self.record(self.fn, tuple(tree_unflatten(args, spec)))
        self.recordings[key] = _Recording(replay, inputs, outputs)
        self.recorded += 1
        while len(self.recordings) > self.max_graphs:
            self.recordings.popitem(last=False)
        return result


def _signature_of(leaf, in_place: bool):
    if isinstance(leaf, torch.Tensor):
        return (tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride(), leaf.data_ptr() if in_place else None)
    return leaf if _hashable(leaf) else repr(leaf)


def _hashable(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _copy(x):
    return x.clone() if isinstance(x, torch.Tensor) else x

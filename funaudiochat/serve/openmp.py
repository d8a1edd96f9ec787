"""One OpenMP thread team in the server process: the engine thread's.

libgomp (torch's OpenMP runtime on Linux) keeps a pool of worker threads for every thread that has run a parallel
region, and once the pools hold more threads than the machine has cores it stops letting idle workers spin between
regions: each region then wakes its workers through the kernel. A compiled decode step is hundreds of short
parallel regions, so on machine F (2 cores) the engine thread's one-row step took 26-34 ms instead of 8 ms as soon
as the main thread, which had loaded the model, kept a pool of its own (8.7 ms once that pool was freed;
BENCHMARKS.md, stop 45). So in `funaudiochat serve` every other thread that may run torch code (the prompt
builders, the detokenizer workers, the event loop's executor) runs it on one thread (`one_thread_here`), and the
main thread frees its pool after loading (`release_pool_here`). Where torch does not use libgomp, both do nothing.
"""
from __future__ import annotations

import ctypes
import functools
import logging

import torch

log = logging.getLogger(__name__)

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: the calling thread's pool threads are stopped


@functools.cache
def _libgomp():
    try:  # (the copy torch loaded: the loader matches the soname of a library already in the process)
        return ctypes.CDLL("libgomp.so.1")
    except OSError:
        log.debug("no libgomp in this process: OpenMP pools are left as they are")
        return None


def threads_here(n: int) -> None:
    """Torch work started by this thread (its own kernels, MKL's and oneDNN's) runs on `n` threads.

    torch.set_num_threads sets the calling thread's count and a process-wide default, and torch gives a thread the
    default when the thread first uses it, overriding what the thread had set itself before: so use it first
    (otherwise a helper thread that sets 1 in between leaves the engine thread with one thread: 17 against 8 ms a
    step on machine F)."""
    torch.get_num_threads()
    torch.set_num_threads(n)


def one_thread_here() -> None:
    """This thread never gets a pool of OpenMP workers (threads started later default to one thread too)."""
    threads_here(1)


def release_pool_here() -> None:
    """Stop the worker threads this thread's parallel regions have used so far."""
    gomp = _libgomp()
    if gomp is not None:
        gomp.omp_pause_resource_all(OMP_PAUSE_HARD)

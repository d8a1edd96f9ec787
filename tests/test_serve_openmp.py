"""The server keeps one OpenMP team, the engine thread's (serve/openmp.py): helper threads run torch work on one
thread, a thread can stop its pool's workers, and a helper's count never leaks into the engine thread."""
import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import torch

from funaudiochat.engine.generate import Engine
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.serve.openmp import one_thread_here, release_pool_here, threads_here
from funaudiochat.serve.scheduler import Request, Scheduler
from funaudiochat.text.chat import user_content
from tests.helpers import make_tiny_tokenizer, noise_audio, run_in_thread


_POOL_CHECK = """
import os, time, torch
from funaudiochat.serve.openmp import one_thread_here, release_pool_here, threads_here
from tests.helpers import run_in_thread

def count():
    return len(os.listdir("/proc/self/task"))

x = torch.randn(512, 512)

def helper():
    one_thread_here()
    before = count()
    (x @ x).sum()  # a BLAS product and a reduction: both would start workers with two threads
    return count() - before

def settle(n):
    deadline = time.monotonic() + 2.0  # a joined thread's task can linger in /proc for a moment
    while count() != n and time.monotonic() < deadline:
        time.sleep(0.01)

def two_threads():
    threads_here(2)
    before = count()
    (x @ x).sum()
    started = count() - before
    release_pool_here()
    settle(before)
    return started, count() - before

alone = count()
helper_started = run_in_thread(helper)
settle(alone)  # the helper's thread gone, so that two_threads counts from the same threads
print(helper_started, *run_in_thread(two_threads))
"""


def test_a_helper_thread_gets_no_workers_and_a_released_pool_is_gone():
    """In a fresh process: the thread count is the process's, so no other test's threads may come or go meanwhile."""
    run = subprocess.run([sys.executable, "-c", _POOL_CHECK], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    helper_started, started, left = map(int, run.stdout.split())
    assert helper_started == 0
    assert started >= 1 and left == 0, (started, left)  # (the check above can fail: two threads do start one)


def test_a_helper_setting_one_thread_does_not_reach_a_thread_that_set_its_own():
    """torch gives a thread the process-wide default on its first use, even after it set its own count."""
    def engine_like(set_threads):
        mine, helper_done = threading.Event(), threading.Event()

        def helper():
            mine.wait()
            one_thread_here()  # sets the default to 1
            helper_done.set()
        other = threading.Thread(target=helper)
        other.start()
        set_threads(2)
        mine.set()
        helper_done.wait()
        other.join()
        return torch.get_num_threads()

    assert run_in_thread(lambda: engine_like(threads_here)) == 2
    assert run_in_thread(lambda: engine_like(torch.set_num_threads)) == 1  # what threads_here guards against


def test_the_engine_thread_keeps_its_threads_while_prompt_builders_use_one(tmp_path):
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    seen = []
    model.language_model.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sched = Scheduler(Engine(model.eval()), make_tiny_tokenizer(tmp_path), max_sessions=2)
    finally:
        torch.set_num_threads(previous)

    async def main():
        sched.start()
        try:  # an audio question: its log-mel features are computed on a prompt-builder thread (one thread)
            session = await sched.submit(Request([{"role": "user", "content": user_content(1)}],
                                                 [noise_audio(0.5, 1)], generation={"max_new_tokens": 3},
                                                 audio_out=False))
            async for _ in session:
                pass
        finally:
            sched.close()
    asyncio.run(main())
    assert seen and set(seen) == {2}, seen


def test_the_cpp_kernels_leave_a_threads_count_as_the_thread_set_it():
    """The int8 and mel kernels split their loops over the calling thread's OpenMP threads without ATen's inline
    lazy set-up, which, inlined in each kernel library with a per-thread flag of its own, reset a thread's count to
    the process-wide default at the thread's first call: after a helper's `one_thread_here` (default 1), the server's
    engine thread fell to one thread at its first int8 product."""
    from funaudiochat.audio import mel_kernel
    from funaudiochat.audio.mel import log_mel
    from funaudiochat.model import int8_kernel
    from funaudiochat.model.quantize import quantize_weight

    int8_op = int8_kernel.load()
    if int8_op is None or mel_kernel.load() is None:
        import pytest
        pytest.skip("the C++ kernels do not build on this CPU")
    q, scale = quantize_weight(torch.randn(256, 64))
    wav = torch.randn(16000)

    def engine_like():
        threads_here(2)
        helper = threading.Thread(target=one_thread_here)  # the process-wide default becomes 1
        helper.start()
        helper.join()
        int8_op(torch.randn(1, 64), q, scale)  # (this thread's first call of each library)
        after_int8 = torch.get_num_threads()
        log_mel(wav)
        return after_int8, torch.get_num_threads()

    assert run_in_thread(engine_like) == (2, 2)

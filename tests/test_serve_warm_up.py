"""`serve --compile` warms up (serve/warm_up.py): after its synthetic requests, real traffic of the warmed kind (one
row on a cache size never seen, several rows on the first and on a longer cache, one row on a short cache) compiles
no graph, so no session waits for a compile mid-traffic. Run in a fresh process: dynamo's graphs and counters are per process."""
import asyncio
import json
import os
import subprocess
import sys

import pytest
import torch

from funaudiochat.engine.generate import Engine
from funaudiochat.errors import InputError
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.serve.scheduler import Request, Scheduler
from funaudiochat.serve.warm_up import parse_kinds, warm_up
from tests.helpers import make_tiny_tokenizer

SCRIPT = """
import asyncio, json, sys, torch
from torch._dynamo.utils import counters
sys.path.insert(0, {root!r})
from funaudiochat.engine.compiled import CACHE_BUCKET
from funaudiochat.engine.events import TurnEnd
from funaudiochat.engine.generate import Engine
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.serve.scheduler import Request, Scheduler
from funaudiochat.serve.warm_up import warm_up
from tests.helpers import make_tiny_tokenizer, words

torch.manual_seed(0)
model = FunAudioChatModel(tiny())
model.init_weights(0.3)
sched = Scheduler(Engine(model.eval(), compile=True), make_tiny_tokenizer({tok!r}), max_sessions=4)

def request(n_words, max_new):
    return Request([{{"role": "user", "content": words([40 + i % 400 for i in range(n_words)])}}], mode="s2s",
                   generation={{"max_new_tokens": max_new}}, audio_out=False)

async def answer(requests):
    async def drain(session):
        async for event in session:
            if isinstance(event, TurnEnd):
                return len(event.text_ids)
    return await asyncio.gather(*(drain(s) for s in await sched.submit_together(requests)))

async def main():
    sched.start()
    graphs = [counters["stats"]["unique_graphs"]]
    if {warm!r}:
        await warm_up(sched, ("s2s",))
    graphs.append(counters["stats"]["unique_graphs"])
    steps = sum(sched.metrics.step_seconds.counts)
    lengths = []
    # one row on a cache of 3 buckets, three rows on one bucket, two rows on 3 buckets, one row on one bucket
    for requests in ([request(2 * CACHE_BUCKET + 20, 6)], [request(10, 6), request(30, 5), request(50, 6)],
                     [request(10, 6), request(2 * CACHE_BUCKET + 20, 6)], [request(10, 6)]):
        lengths += await answer(requests)
        graphs.append(counters["stats"]["unique_graphs"])
    sched.close()
    print(json.dumps({{"graphs": graphs, "lengths": lengths,
                      "steps": sum(sched.metrics.step_seconds.counts) - steps}}))

asyncio.run(main())
"""


def _run(tmp_path, warm: bool) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = SCRIPT.format(root=root, tok=str(tmp_path / "tok"), warm=warm)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200,
                          cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")  # (the second run loads the first one's compiled code: shorter)


def test_traffic_after_the_warm_up_compiles_no_graph(inductor_cache):
    warmed = _run(inductor_cache, warm=True)
    graphs = warmed["graphs"]
    assert graphs[1] - graphs[0] >= 3, graphs  # the warm-up compiled: one row, several rows, one row again
    assert warmed["steps"] >= 3 and graphs[-1] == graphs[1], warmed  # traffic decoded, and compiled nothing


def test_without_the_warm_up_the_same_traffic_compiles_mid_way(inductor_cache):
    """The check above can fail: the same traffic on a cold server compiles graphs while sessions run."""
    cold = _run(inductor_cache, warm=False)
    assert cold["graphs"][-1] > cold["graphs"][1], cold


def test_warm_up_kinds_are_checked():
    assert parse_kinds("s2s, s2t") == ("s2s", "s2t") and parse_kinds("none") == ()
    with pytest.raises(InputError, match="unknown kind"):
        parse_kinds("s2s,tts")


@pytest.mark.parametrize("context", [4096, 100], ids=["long_context", "one_bucket_context"])
def test_a_one_session_server_warms_up_one_row_at_a_time(tmp_path, one_thread, context):
    """With --max-sessions 1 the warm-up's pair runs as one row (two held rows would wait for each other), and
    asking for more requests together than there are sessions is refused, not a wait that never ends. A context
    shorter than a cache bucket has no longer cache to warm up."""
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    sched = Scheduler(Engine(model.eval(), max_seq_len=context), make_tiny_tokenizer(tmp_path), max_sessions=1,
                      wait_timeout_s=30)

    async def main():
        sched.start()
        try:
            await asyncio.wait_for(warm_up(sched), 120)
            with pytest.raises(InputError, match="2 requests cannot run together on 1 sessions"):
                await sched.submit_together([Request([{"role": "user", "content": "hi"}]) for _ in range(2)])
        finally:
            sched.close()
    asyncio.run(main())
    assert sum(sched.metrics.step_seconds.counts) >= 6  # both kinds decoded (3 questions each, 3 steps past the first)

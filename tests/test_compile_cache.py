"""Compiled decode steps persist across processes (issue 15 must-show 2): a second process that compiles the same
step loads it from inductor's FX graph cache and AOT autograd's cache, so only dynamo's tracing is left at its start.
Anything in the traced step that AOT autograd cannot cache (weight freezing, a Python-level tensor method such as
`Tensor.split`) makes every start compile again; this test names it. And within a process, batch and cache sizes
after the first other one share a symbolic graph."""
import json
import os
import subprocess
import sys

STEP = """
import json, torch
from torch._dynamo.utils import counters
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.prompt import Prompt
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
torch.manual_seed(0)
model = FunAudioChatModel(tiny("qwen3"))
model.init_weights(0.3)
engine = Engine(model.eval(), compile=True)
gen = GenerationConfig(max_new_tokens=4, disable_speech=True, text_greedy=True, eos_token_id=502, pad_token_id=500)
out = engine.generate(Prompt(torch.arange(30, 39)[None]), gen)
print(json.dumps({"aot": dict(counters["aot_autograd"]), "inductor": dict(counters["inductor"]),
                  "ids": out.new_text_ids.tolist()}))
"""


def _run(cache_dir) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_compiled_step_from_the_caches(tmp_path):
    first, second = _run(tmp_path), _run(tmp_path)
    assert first["aot"].get("autograd_cache_miss", 0) >= 1  # (the first one compiled it)
    assert not second["aot"].get("autograd_cache_bypass"), second["aot"]
    assert second["aot"].get("autograd_cache_hit", 0) >= 1 and not second["aot"].get("autograd_cache_miss"), second
    assert second["ids"] == first["ids"]



SHAPES = """
import json, torch
from torch._dynamo.utils import counters
from funaudiochat.engine.compiled import CACHE_BUCKET
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.prompt import Prompt
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
torch.manual_seed(0)
model = FunAudioChatModel(tiny("qwen3"))
model.init_weights(0.3)
engine = Engine(model.eval(), compile=True)
gen = GenerationConfig(max_new_tokens=3, eos_token_id=10**6, pad_token_id=500, force_text_abos=True, text_greedy=True)
graphs = []
# one row on a short cache, two rows on a longer one, one row on the longer one; then other batch and cache sizes
for rows, length in ((1, 8), (2, CACHE_BUCKET + 8), (1, CACHE_BUCKET + 8), (3, 20), (8, 2 * CACHE_BUCKET + 40),
                     (5, 3 * CACHE_BUCKET)):
    ids = torch.arange(length).repeat(rows, 1) % 400 + 40
    engine.generate(Prompt(ids, torch.ones_like(ids)), gen)
    graphs.append(counters["stats"]["unique_graphs"])
print(json.dumps(graphs))
"""


def test_batch_and_cache_sizes_share_one_graph_after_the_first(tmp_path):
    """The compiled S2S step is specialised on its first shapes only: the next batch size or cache length compiles
    a graph with them as symbols, which serves every later batch (up to 8 rows) and cache size, instead of one
    graph per batch size and cache bucket (each about a minute for the mini on 2 cores, stalling a server)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SHAPES], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    graphs = json.loads(done.stdout.strip().splitlines()[-1])
    assert graphs[2] <= 3 and graphs[-1] == graphs[2], graphs

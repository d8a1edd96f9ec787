"""Time prefill and per-step decode (S2T and S2S) on a random model built from a config.json.

    .venv/bin/python bench/generate.py ../shared/bench/bench_config.json|8b [--threads 2] [--steps 64]
        [--compile [--no-cuda-graphs]] [--device cuda] [--dtype fp32|bf16|int8] [--sampled] [--released-python REF_VENV/bin/python --released-code DIR [--rounds 3]]

S2S step = one LLM step (text token) + the SRH's 5 speech tokens; S2T step = one LLM step with the SRH off.
Medians over repeated runs after warm-up; fp32 on CPU by default (int8: weight-only int8 linears in the LLM and the
SRH, model/quantize.py). With --released-python/--released-code the
released generate() is timed on the same config and prompt in rounds alternating with ours
(bench/released_generate.py, run in an environment with the released code's pins); the ratio printed is the median
of the per-round ratios, each round comparing runs made seconds apart.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from funaudiochat.config import FunAudioChatConfig
from funaudiochat.engine.device import resolve_device
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.presets import S2M_SAMPLING
from funaudiochat.engine.prompt import Prompt
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.errors import InputError
from funaudiochat.model.presets import fun_audio_chat_8b
from funaudiochat.model.quantize import Int8Weight, quantize_model

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags


def make_prompt(cfg: FunAudioChatConfig, length: int, seed: int = 0, batch: int = 1) -> Prompt:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(cfg.text_config.vocab_size, 400), (batch, length), generator=g)
    return Prompt(input_ids=ids, attention_mask=torch.ones_like(ids))


def time_run(engine: Engine, prompt: Prompt, gen: GenerationConfig, repeats: int):
    """Median prefill seconds (to the first text token, as bench/released_generate.py times the released code) and
    median per-step seconds (steps after the first). Every step reads its token ids back, so a GPU is in sync."""
    prefills, steps = [], []
    for _ in range(repeats):
        t_prev = time.perf_counter()
        first = True
        for _ in engine.steps(prompt, gen):
            now = time.perf_counter()
            (prefills if first else steps).append(now - t_prev)
            first = False
            t_prev = now
    return statistics.median(prefills), statistics.median(steps), len(steps) // repeats


def step_weights(model: FunAudioChatModel) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The matrices one S2T step and one S2S step multiply a row vector by, in order (fused as the engine runs)."""
    def stack(bb):
        ws = [w for layer in bb.layers for w in (layer.self_attn.fused[0], layer.self_attn.o_proj.weight,
                                                 layer.mlp.fused, layer.mlp.down_proj.weight)]
        return [w.q if isinstance(w, Int8Weight) else w for w in ws]  # int8: the bytes streamed are the int8 ones
    llm = stack(model.language_model.model) + [model.language_model.lm_head.weight]
    srh = model.audio_invert_tower
    if srh is None:  # a speech-to-text model has no S2S step
        return llm, []
    srh_call = ([srh.input_matching.weight] + stack(srh.crq_transformer)
                + [srh.output_matching.weight, srh.lm_head.weight])
    return llm, llm + [srh.pre_matching.weight] + srh_call * srh.group_size


def weight_read_floor(weights: list[torch.Tensor], repeats: int = 50) -> float:
    """Median seconds to stream a step's weights once (a sum over each one's bytes, eager): the memory traffic
    alone, a floor for any engine that keeps them in this dtype (bench/matvec.py compares the ways to multiply by
    them). The bytes are summed as int64 words where they fill whole words: torch's int8 sum converts element by
    element and ran 40x slower than the read itself. On a GPU, where one launch per matrix would be timed instead,
    the bytes over the rate of one large read."""
    if weights[0].device.type == "cuda":
        return sum(w.numel() * w.element_size() for w in weights) / gpu_read_rate()
    words = [w.reshape(-1).view(torch.int64) if w.numel() * w.element_size() % 8 == 0 else w for w in weights]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in words:
            w.sum()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def gpu_read_rate(gib: int = 4, repeats: int = 20) -> float:
    """Bytes per second one reduction kernel reads from GPU memory (a `gib` GiB bf16 tensor, median)."""
    x = torch.ones(gib * 2**29, dtype=torch.bfloat16, device="cuda")
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return x.numel() * 2 / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="a config.json, or '8b' for the released Fun-Audio-Chat-8B shape (SPEC.md §1.2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="rows decoded together (one conversation each; a step's "
                    "time is the whole batch's)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and the released code")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="Engine(compile=True): compiled decode step")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU, compiled steps launched from Python "
                    "instead of replayed as CUDA graphs")
    ap.add_argument("--sampled", action="store_true", help="the default S2S preset's sampling (temperature 0.8, "
                    "top-p 0.9, repetition penalty 1.2, greedy text) on both sides, instead of greedy decoding")
    ap.add_argument("--modes", nargs="+", default=["s2s", "s2t"], choices=["s2s", "s2t"],
                    help="what to time (a large model compiles one graph per mode)")
    ap.add_argument("--released-python", default=None, help="python of an environment with the released pins")
    ap.add_argument("--released-code", default=None, help="folder holding the released funaudiochat package")
    args = ap.parse_args()
    try:  # a device this machine lacks (cuda on a CPU-only torch): one line naming the devices it has
        resolve_device(args.device)
    except InputError as err:
        ap.error(str(err))
    torch.set_num_threads(args.threads)
    print(machine_line())
    torch.manual_seed(0)
    if args.config == "8b":
        if args.released_python:
            raise SystemExit("the released-code comparison needs a config.json")
        cfg, config_name = fun_audio_chat_8b(), "Fun-Audio-Chat-8B shape"
    else:
        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"no config file at {path}: give a config.json, or '8b'")
        cfg, config_name = FunAudioChatConfig.from_dict(json.loads(path.read_text())), path.name
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device(args.device):
        model = FunAudioChatModel(cfg)
    model.init_weights(0.02)
    model = model.to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    if args.dtype == "int8":
        quantize_model(model)
    if args.device.startswith("cuda"):  # the peak from here on: the engine's, not the fp32 initialisation's
        gpu_read_rate()  # (measured now, so that its 4 GiB tensor is not in that peak)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine = Engine(model, compile=args.compile, cuda_graphs=not args.no_cuda_graphs)
    if args.batch < 1 or (args.batch > 1 and args.released_python):
        raise SystemExit("--batch must be >= 1, and 1 beside the released code")
    prompt = make_prompt(cfg, args.prompt_len, batch=args.batch)
    t = cfg.text_config
    # eos/pad ids outside the vocabulary keep random weights from stopping early
    base = dict(max_new_tokens=args.steps, eos_token_id=t.vocab_size, pad_token_id=0,
                **(S2M_SAMPLING if args.sampled else {}))
    s2s = GenerationConfig(**base, force_text_abos=True, text_greedy=True)
    s2t = GenerationConfig(**base, disable_speech=True, text_greedy=True)
    released = None
    if args.released_python and args.released_code:
        cmd = [args.released_python, str(Path(__file__).with_name("released_generate.py")), str(args.config),
               "--official", args.released_code, "--threads", str(args.threads), "--steps", str(args.steps),
               "--prompt-len", str(args.prompt_len), "--repeats", str(args.repeats), "--serve"]
        cmd += ["--sampled"] if args.sampled else []
        released = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if released.stdout.readline().strip() != "ready":
            raise SystemExit("the released-code timer failed to start (see its error above)")
    modes = {"s2s": s2s, "s2t": s2t}
    modes = {name: modes[name] for name in args.modes}
    t0 = time.perf_counter()
    for gen in modes.values():
        time_run(engine, prompt, gen, 1)  # warm-up (and compilation)
    warm_up_s = time.perf_counter() - t0
    ours, theirs, floors = [], [], []
    s2t_weights, s2s_weights = step_weights(model)
    for _ in range(args.rounds):  # alternate so that both see the same machine state (shared VMs drift)
        times = {}
        for name, gen in modes.items():
            times[f"prefill_s_{name}"], times[f"step_s_{name}"], n_steps = time_run(engine, prompt, gen, args.repeats)
        ours.append(times)
        if s2s_weights:
            floors.append(dict(step_s_s2t=weight_read_floor(s2t_weights), step_s_s2s=weight_read_floor(s2s_weights)))
        if released is not None:
            released.stdin.write("round\n")
            released.stdin.flush()
            theirs.append(json.loads(released.stdout.readline()))
    if released is not None:
        released.stdin.close()
        released.wait()
    print(f"model: {config_name}, {n_params / 1e6:.1f}M parameters, {args.dtype}, {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}, compile={args.compile}, batch {args.batch}, "
          f"{'sampled (S2S preset)' if args.sampled else 'greedy'}; "
          f"medians of {n_steps} steps x {args.repeats} runs, {args.rounds} rounds")
    rows = [("prefill, S2S (SRH on the prompt too)", "prefill_s_s2s"), ("prefill, S2T", "prefill_s_s2t"),
            ("S2S step (text + 5 speech tokens)", "step_s_s2s"), ("S2T step (text only)", "step_s_s2t")]
    rows = [(label, key) for label, key in rows if key in ours[0]]
    print(f"{'':38s} {'ours':>8s}" + (f" {'released':>9s} {'ratio':>6s}  ratio per round" if theirs else ""))
    for label, key in rows:
        line = f"{label:38s} {statistics.median(r[key] for r in ours) * 1e3:6.2f}ms"
        if theirs:
            ratios = [a[key] / b[key] for a, b in zip(ours, theirs)]
            line += (f" {statistics.median(r[key] for r in theirs) * 1e3:7.2f}ms {statistics.median(ratios):6.2f}  "
                     + " ".join(f"{r:.2f}" for r in ratios))
        print(line)
    print(f"warm-up (one run of each mode, compilation included): {warm_up_s:.1f} s")
    if args.device.startswith("cuda"):
        graphs = [getattr(engine.compiled, name, None) for name in ("llm", "s2s")] if engine.compiled else []
        recorded = ", ".join(f"{g.fn.__name__} {g.recorded}" for g in graphs if hasattr(g, "recorded"))
        print(f"GPU memory: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated after the model was "
              f"built (prefill and decode, caches, graphs), weights "
              f"{sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30:.2f} GiB"
              + (f"; CUDA graphs recorded: {recorded}" if recorded else ""))
    for label, key in [(label, key) for label, key in rows if key.startswith("step")] if floors else []:
        floor = statistics.median(f[key] for f in floors)
        mb = sum(w.numel() * w.element_size() for w in (s2s_weights if key == "step_s_s2s" else s2t_weights)) / 1e6
        print(f"weight-read floor, {label.split(' (')[0]}: {mb:.0f} MB streamed in {floor * 1e3:.2f}ms"
              + (f" = {floor / statistics.median(r[key] for r in theirs):.2f} of the released step" if theirs else ""))


if __name__ == "__main__":
    main()

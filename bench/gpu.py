"""GPU checks for the compiled decode steps replayed as CUDA graphs (engine/cuda_graphs.py); step times are
bench/generate.py's (`--device cuda --compile`, and `--no-cuda-graphs` for the same steps launched from Python).

    python bench/gpu.py check         # tiny random model: the ids of CUDA graphs = CUDA eager = CPU eager
    python bench/gpu.py first-audio   # 8B shape, bf16, released-size detokenizer: end of prompt -> first audio

first-audio: a 50-token text prompt, greedy S2S; each step's speech group goes to a streaming detokenizer (hop 15,
look-ahead 3, as the web demo); the time is from the call to the first audio chunk, with the prefill, 4 S2S steps
and the first flow + HiFT call in it. Random weights: the speech codes are random, which costs the detokenizer the
same as real ones.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from funaudiochat.engine.generate import Engine, GenerationConfig, Tracer
from funaudiochat.engine.presets import S2M_SAMPLING
from funaudiochat.engine.prompt import Prompt, stack_prompts
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import fun_audio_chat_8b, tiny

from machine import machine_line  # bench/machine.py


def check() -> None:
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny("qwen3")).eval()
    model.init_weights(0.3)
    g = torch.Generator().manual_seed(0)
    prompts = [Prompt(torch.randint(30, 400, (1, n), generator=g)) for n in (9, 5)]
    batch = stack_prompts(prompts, 500, model.cfg.audio_config.pad_token_id)
    base = dict(max_new_tokens=24, eos_token_id=502, pad_token_id=500, text_greedy=True)
    cases = {"greedy S2S, left-padded batch of 2": (batch, GenerationConfig(**base, force_text_abos=True)),
             "greedy S2T": (prompts[0], GenerationConfig(**base, disable_speech=True)),
             "sampled S2S preset, seed 3": (prompts[0], GenerationConfig(**base, **S2M_SAMPLING,
                                                                         force_text_abos=True, seed=3))}
    runs = {}
    for name, device, compile in (("CPU eager", "cpu", False), ("CUDA eager", "cuda", False),
                                  ("CUDA graphs", "cuda", True)):
        engine = Engine(model.to(device), compile=compile)
        runs[name] = {}
        for case, (prompt, gen) in cases.items():
            tracer = Tracer()
            out = engine.generate(prompt, gen, tracer)
            runs[name][case] = (out.new_text_ids.tolist(), out.speech_ids, torch.stack(tracer.text_logits).cpu())
        if compile:
            print(f"CUDA graphs recorded: llm {engine.compiled.llm.recorded}, s2s {engine.compiled.s2s.recorded}")
    ref = runs["CUDA graphs"]
    for name in ("CUDA eager", "CPU eager"):
        for case in cases:
            if name == "CPU eager" and "sampled" in case:
                continue  # CPU and CUDA generators draw different numbers
            ids, speech, logits = runs[name][case]
            same = ids == ref[case][0] and speech == ref[case][1]
            diff = (logits - ref[case][2]).abs().max() / logits.abs().max()
            print(f"{case:36s} CUDA graphs vs {name}: ids {'equal' if same else 'DIFFER'}, "
                  f"{sum(len(s) for s in speech)} speech tokens, text logits within {diff:.1e} of their max")


def first_audio(runs: int) -> None:
    from funaudiochat.speech.cosyvoice_config import CosyVoiceConfig
    from funaudiochat.speech.detokenizer import Detokenizer
    from funaudiochat.speech.flow import TokenToMelFlow
    from funaudiochat.speech.vocoder import HiFTVocoder, released_source_rng

    torch.manual_seed(0)
    cfg = fun_audio_chat_8b()
    with torch.device("cuda"):
        model = FunAudioChatModel(cfg)
    model.init_weights(0.02)
    model = model.to(torch.bfloat16).eval()
    engine = Engine(model, compile=True)
    dcfg = CosyVoiceConfig()
    flow, hift = TokenToMelFlow(dcfg.flow).cuda().eval(), HiFTVocoder(dcfg.hift, rng=released_source_rng(dcfg))
    hift = hift.cuda().eval()
    hift.fold_weight_norm()
    detok = Detokenizer(flow, hift, speaker=torch.randn(1, dcfg.flow.spk_embed_dim))
    prompt = Prompt(torch.randint(0, 400, (1, 50), generator=torch.Generator().manual_seed(0)))
    t = cfg.text_config
    gen = GenerationConfig(max_new_tokens=64, eos_token_id=t.vocab_size, pad_token_id=0, force_text_abos=True,
                           text_greedy=True)
    n_codes = dcfg.flow.vocab_size
    times, steps = [], []
    for run in range(runs + 1):  # the first run compiles and records
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stream = detok.stream(hop=15)
        for n, (_, step) in enumerate(engine.steps(prompt, gen), 1):
            if step.speech is None or not bool(step.speech_mask[0]):
                continue
            codes = [c % n_codes for c in step.speech[0].tolist()]  # random weights: keep them in the vocabulary
            if stream.push(codes):
                break
        torch.cuda.synchronize()
        if run:
            times.append(time.perf_counter() - t0)
            steps.append(n)
        else:
            print(f"first run (compilation and graph recording included): {time.perf_counter() - t0:.1f} s")
    print(f"8B bf16 S2S + released-size detokenizer (fp32): first audio chunk after {statistics.median(steps)} "
          f"steps, median {statistics.median(times) * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max "
          f"{max(times) * 1e3:.1f}) over {runs} runs; peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["check", "first-audio"])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU and a CUDA build of torch")
    print(machine_line())
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    with torch.no_grad():
        check() if args.what == "check" else first_audio(args.runs)


if __name__ == "__main__":
    main()

"""Real-time factor of speech tokens -> 24 kHz wav (flow + HiFT), offline and streaming, on random weights.

    .venv/bin/python -m bench.detokenizer [--threads 2] [--config tiny|released|both] [--seconds S]

RTF = compute seconds / audio seconds (below 1 is faster than real time). Per config: offline `token2wav`
(one finalising call with full attention) with its flow / HiFT split; streaming with hop 15 (web demo; each chunk
re-runs the flow on all tokens so far and HiFT on the whole accumulated mel) and with the web demo's 200-token flow
window; HiFT with weight norm as parametrizations vs folded, side by side. Best of `--runs` runs (steadier than the
median on a shared machine).
"""
from __future__ import annotations

import argparse
import time

import torch

from funaudiochat.speech.cosyvoice_config import CosyVoiceConfig, tiny
from funaudiochat.speech.detokenizer import Detokenizer
from funaudiochat.speech.flow import TokenToMelFlow
from funaudiochat.speech.vocoder import HiFTVocoder, released_source_rng

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags


def best_of(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def stream_all(detok: Detokenizer, tokens: list[int], **kw) -> None:
    session = detok.stream(hop=15, **kw)
    for start in range(0, len(tokens), 5):  # the LLM delivers 5 speech tokens per step
        session.push(tokens[start:start + 5])
    session.finalize()


def bench(name: str, cfg: CosyVoiceConfig, seconds: float, runs: int) -> None:
    torch.manual_seed(0)
    flow = TokenToMelFlow(cfg.flow)
    hift = HiFTVocoder(cfg.hift, rng=released_source_rng(cfg))
    detok = Detokenizer(flow, hift, speaker=torch.randn(1, cfg.flow.spk_embed_dim))
    n_tokens = int(seconds * cfg.token_frame_rate)
    tokens = torch.randint(0, cfg.flow.vocab_size, (n_tokens,)).tolist()
    audio_s = n_tokens * cfg.samples_per_token / cfg.sample_rate
    emb = detok.speaker_embedding()
    with torch.inference_mode():
        mel = flow.inference(torch.tensor([tokens]), emb)
        t_flow = best_of(lambda: flow.inference(torch.tensor([tokens]), emb), runs)
        t_hift_wn = best_of(lambda: hift(mel), runs)
        hift.fold_weight_norm()
        t_hift = best_of(lambda: hift(mel), runs)
    t_offline = best_of(lambda: detok.token2wav(tokens), runs)
    t_stream = best_of(lambda: stream_all(detok, tokens), runs)
    t_window = best_of(lambda: stream_all(detok, tokens, flow_window=200), runs)
    print(f"{name}: {n_tokens} tokens = {audio_s:.1f} s of audio")
    print(f"  offline token2wav      {t_offline:8.2f} s   RTF {t_offline / audio_s:6.3f}"
          f"   (flow {t_flow:.2f} s, HiFT {t_hift:.2f} s)")
    print(f"  HiFT weight norm: parametrized {t_hift_wn:.3f} s, folded {t_hift:.3f} s "
          f"(x{t_hift_wn / t_hift:.2f})")
    print(f"  streaming, hop 15      {t_stream:8.2f} s   RTF {t_stream / audio_s:6.3f}")
    print(f"  streaming, window 200  {t_window:8.2f} s   RTF {t_window / audio_s:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", choices=["tiny", "released", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=None, help="audio length (default: 10 tiny, 2 released)")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"torch {torch.__version__}, {args.threads} threads, CPU fp32, best of {args.runs} runs")
    if args.config in ("tiny", "both"):
        bench("tiny (cv-tiny: DiT 64x2, HiFT base 16)", tiny(), args.seconds or 10.0, args.runs)
    if args.config in ("released", "both"):
        bench("released size (DiT 1024x22, HiFT base 512)", CosyVoiceConfig(), args.seconds or 2.0, args.runs)


if __name__ == "__main__":
    main()

"""fun-audio-chat-mini's speech tokens, must-show 1 of issue 14: held-out assistant-voice sentences through the
phonetic tokenizer and the Piper detokenizer, judged by the ASR judge, with the Piper original beside them.

    .venv/bin/python bench/mini_speech_tokens.py [--n 30] [--hop 15] [--max-hop 60] [--out DIR]

For each of the HELD_OUT sentences (written for this check, used for nothing else): the packaged Piper voice as
piper itself speaks it (the original: its own random noise, 22.05 kHz), and tokens = PiperTokenizer.tokenize(text)
decoded one-shot (`token2wav`) and streamed (`stream(hop, max_hop)`, 5 tokens per push as the SRH delivers them),
both at 24 kHz. Prints the corpus WER / CER of Whisper tiny.en (`funaudiochat.eval.asr.AsrJudge`) of each, the
detokenizer's real-time factor one-shot and streamed (wall seconds / audio seconds, one thread; and CPU seconds /
audio seconds, which a shared machine inflates less), the stream-vs-one-shot SNR, the largest sample step at chunk
boundaries against the largest step inside the audio, tokens per second and the first chunk's token count. Acceptance (issue 14): token resynthesis WER <= 3 %.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from funaudiochat.audio.io import save_wav
from funaudiochat.eval.asr import AsrJudge, error_rates
from funaudiochat.eval.normalize import normalize_english
from funaudiochat.speech import piper_detokenizer
from funaudiochat.speech.piper_detokenizer import MAX_HOP, PiperDetokenizer
from funaudiochat.speech.piper_tokens import PiperTokenizer
from funaudiochat.speech.piper_voice import PiperVoiceParts, voice_files

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags

HELD_OUT = (
    "Sure, I can help you plan a quiet weekend at home.",
    "That sounds like a lovely idea for a birthday present.",
    "I'm sorry to hear you had such a long day at work.",
    "The train usually leaves the station a few minutes after nine.",
    "You could try adding a little lemon juice to brighten the soup.",
    "If you water the plant once a week, it should stay healthy.",
    "Let me know when you're ready, and we can start the next step.",
    "A good night's sleep often makes the morning feel much easier.",
    "Honestly, I think both options would work well for you.",
    "The museum is closed on Mondays, so Tuesday might be better.",
    "Take a deep breath, then count slowly from one to ten.",
    "Many people enjoy walking by the river in the early evening.",
    "Would you like me to read the recipe back to you?",
    "It's a good habit to back up your photos every month.",
    "The library has a great collection of books about old ships.",
    "Don't worry, small mistakes are part of learning anything new.",
    "I'd suggest wearing a warm jacket, because it may rain later.",
    "Your friend will probably appreciate a short and honest message.",
    "Cooking rice is easier when you measure the water carefully.",
    "We could make a simple list of everything you need to pack.",
    "That's a thoughtful question, and there is no single right answer.",
    "Most cats sleep for a large part of the day.",
    "Try to stretch your legs every hour when you sit at a desk.",
    "The sunset looked beautiful from the top of the hill.",
    "If the printer still doesn't work, try turning it off and on again.",
    "Reading aloud to children helps them learn new words.",
    "I'm glad the new job is going better than you expected.",
    "Remember to bring your ticket and a bottle of water.",
    "A short walk after dinner can help you relax.",
    "Thanks for telling me; that must have been a hard decision.",
)


def piper_original(texts: list[str]) -> list[np.ndarray]:
    """The voice as piper speaks it (whole model, its own noise), 22.05 kHz."""
    from piper import PiperVoice

    model, config = voice_files()
    voice = PiperVoice.load(model, config)
    return [np.concatenate([c.audio_float_array for c in voice.synthesize(t)]) for t in texts]


def streamed(detok: PiperDetokenizer, tokens: list[int], hop: int,
             max_hop: int) -> tuple[np.ndarray, list[int], int | None]:
    """(audio, chunk lengths, tokens pushed before the first chunk) with 5 tokens per push."""
    session, chunks, first = detok.stream(hop=hop, max_hop=max_hop), [], None
    for start in range(0, len(tokens), 5):
        new = session.push(tokens[start:start + 5])
        if new and first is None:
            first = min(start + 5, len(tokens))
        chunks += new
    chunks.append(session.finalize())
    return np.concatenate(chunks), [len(c) for c in chunks], first


def wer(judge: AsrJudge, texts: list[str], wavs: list[np.ndarray], rate: int) -> tuple[float, float, list[str]]:
    hyps = [judge.transcribe(w, rate) for w in wavs]
    w, c = error_rates([normalize_english(t) for t in texts], [normalize_english(h) for h in hyps])
    return w, c, hyps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=len(HELD_OUT))
    p.add_argument("--hop", type=int, default=15)
    p.add_argument("--max-hop", type=int, default=MAX_HOP, help="later chunks grow up to this (--hop: fixed chunks)")
    p.add_argument("--out", type=Path, default=None, help="also write the wavs here")
    p.add_argument("--decoder-margin", type=int, default=piper_detokenizer.DECODER_MARGIN,
                   help="frames of decoder context around a streamed chunk (24, the flow's margin: the render before "
                        "the flow and the decoder were cut apart)")
    p.add_argument("--texts-from", type=Path, default=None,
                   help="an `eval mini-speech` report.json: its plain answers' texts instead of HELD_OUT (how much of "
                        "the model's speech WER the voice and the judge account for)")
    args = p.parse_args()
    if not 0 <= args.decoder_margin <= piper_detokenizer.MARGIN_LEFT:
        p.error(f"--decoder-margin must be 0 to {piper_detokenizer.MARGIN_LEFT} frames (the flow's margin)")
    piper_detokenizer.DECODER_MARGIN = args.decoder_margin
    print(machine_line())
    texts = list(HELD_OUT[:args.n])
    if args.texts_from is not None:
        items = json.loads(args.texts_from.read_text(encoding="utf-8"))["items"]
        texts = [i["text"] for i in items if not i["instruction"]][:args.n]
    parts = PiperVoiceParts(threads=1)
    tokenizer, detok = PiperTokenizer(parts), PiperDetokenizer(parts)

    start = time.perf_counter()
    tokens = [tokenizer.tokenize(t) for t in texts]
    tokenize_s = time.perf_counter() - start
    oneshot, oneshot_s, oneshot_cpu = [], 0.0, 0.0
    for t in tokens:
        start, cpu = time.perf_counter(), time.process_time()
        oneshot.append(detok.token2wav(t))
        oneshot_s += time.perf_counter() - start
        oneshot_cpu += time.process_time() - cpu
    stream, stream_s, stream_cpu, snrs, steps, firsts = [], 0.0, 0.0, [], [], []
    for t, ref in zip(tokens, oneshot):
        start, cpu = time.perf_counter(), time.process_time()
        audio, lengths, first = streamed(detok, t, args.hop, args.max_hop)
        stream_s += time.perf_counter() - start
        stream_cpu += time.process_time() - cpu
        stream.append(audio)
        firsts.append(first)
        err = audio - ref
        snrs.append(float(10 * np.log10(np.sum(ref ** 2) / max(np.sum(err ** 2), 1e-12))))
        inner = np.abs(np.diff(ref)).max()
        edges = np.cumsum(lengths)[:-1]
        edges = edges[(edges > 0) & (edges < len(audio))]
        if edges.size:
            steps.append(float(np.abs(audio[edges] - audio[edges - 1]).max() / inner))
    original = piper_original(texts)
    seconds = sum(len(w) for w in oneshot) / detok.sample_rate

    judge = AsrJudge(threads=1)
    results = {"sentences": len(texts), "audio_s": round(seconds, 1), "decoder_margin": args.decoder_margin,
               "tokens_per_s": round(sum(map(len, tokens)) / seconds, 2)}
    for name, wavs, rate in (("piper_original", original, parts.sample_rate),
                             ("tokens_oneshot", oneshot, detok.sample_rate),
                             ("tokens_streamed", stream, detok.sample_rate)):
        w, c, hyps = wer(judge, texts, wavs, rate)
        results[name] = {"wer": round(w, 4), "cer": round(c, 4)}
        print(name, results[name], flush=True)
        for text, hyp in zip(texts, hyps):
            if normalize_english(text) != normalize_english(hyp):
                print(f"  {name}: {text!r} -> {hyp!r}")
    results["rtf"] = {"tokenize": round(tokenize_s / seconds, 3), "detok_oneshot": round(oneshot_s / seconds, 3),
                      "detok_streamed": round(stream_s / seconds, 3)}
    # CPU seconds of this process per audio second: closer to a quiet machine's wall time when the CPUs are shared
    results["cpu_rtf"] = {"detok_oneshot": round(oneshot_cpu / seconds, 3),
                          "detok_streamed": round(stream_cpu / seconds, 3)}
    results["stream_vs_oneshot_snr_db"] = {"min": round(min(snrs), 1), "median": round(float(np.median(snrs)), 1)}
    results["boundary_step_over_max_inner_step"] = round(max(steps), 3) if steps else None
    results["first_chunk_after_tokens"] = {"median": float(np.median([f for f in firsts if f])),
                                           "max": int(max(f for f in firsts if f))}
    print(json.dumps(results, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, (o, a, b) in enumerate(zip(original, oneshot, stream)):
            save_wav(args.out / f"{i:02d}_piper.wav", o, parts.sample_rate)
            save_wav(args.out / f"{i:02d}_tokens.wav", a, detok.sample_rate)
            save_wav(args.out / f"{i:02d}_streamed.wav", b, detok.sample_rate)


if __name__ == "__main__":
    main()

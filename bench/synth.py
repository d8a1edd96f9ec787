"""The data factory's speech, measured: intelligibility to the ASR judge, rate / pitch / VAD / augmentation checks,
synthesis and transcription speed.

    .venv/bin/python -m bench.synth [--n 50] [--workers 2] [--decoding]

For each engine (the packaged Piper voice, espeak-ng en-us) it synthesises `--n` English sentences at 16 kHz and
prints: WER/CER of Whisper tiny.en (the ASR judge: int8, beam 5; with `--decoding` also beam 1 and float32, side by
side), synthesis speed in seconds of audio per wall second (one process, then `--workers` processes), the duration
ratio at rate 1.5, the median F0 ratio at +4 semitones (librosa.pyin), and the VAD span error on each sentence
padded with 1 s of silence. Then Mandarin (espeak-ng 1.52 `cmn`) durations and the augmentation checks.
Acceptance: WER <= 10 % (Piper), <= 20 % (espeak); rate 1.5 at least 25 % shorter; F0 at least 15 % higher;
VAD within 100 ms; SNR within 0.5 dB; no telephone energy above 4 kHz.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from funaudiochat.audio.io import load_audio
from funaudiochat.audio.vad import speech_segments
from funaudiochat.data import augment, synth
from funaudiochat.eval.asr import AsrJudge, read_manifest

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags

SENTENCES = [
    "Good morning, I hope you slept well last night.",
    "Can you recommend a good restaurant near the city center?",
    "The train to Boston leaves from platform four at nine fifteen.",
    "Please set an alarm for seven o'clock tomorrow morning.",
    "How many people live in the largest city of Canada?",
    "I forgot my umbrella at the office, and now it is raining.",
    "She plays the piano every evening after dinner.",
    "What is the difference between a virus and a bacterium?",
    "Send a message to Peter saying that I will be late.",
    "The museum is closed on Mondays but open every other day.",
    "Could you explain how a rainbow is formed?",
    "We are planning a trip to the mountains next summer.",
    "My brother works as a nurse at the local hospital.",
    "Add milk, eggs and bread to my shopping list.",
    "Why is the sky blue during the day and red at sunset?",
    "The meeting has been moved to Thursday afternoon.",
    "I would like to book a table for two people tonight.",
    "Tell me a short story about a brave little mouse.",
    "The library has thousands of books about history and science.",
    "How long does it take to boil an egg?",
    "Our neighbors adopted a small dog from the shelter.",
    "Turn up the volume, I can barely hear the music.",
    "Which planet is the closest to the sun?",
    "He has been learning to speak Spanish for two years.",
    "Remind me to water the plants on Saturday.",
    "The bakery on the corner sells the best bread in town.",
    "What should I cook for dinner if I only have rice and beans?",
    "I am feeling a little sad today and I do not know why.",
    "The children built a sandcastle on the beach.",
    "Can you translate this sentence into French for me?",
    "It is important to drink enough water when it is hot.",
    "The flight was delayed because of the heavy snow.",
    "Who wrote the famous play about Romeo and Juliet?",
    "Please speak a little more slowly, I am taking notes.",
    "My grandmother grows tomatoes and peppers in her garden.",
    "How do I reset the password for my email account?",
    "The concert starts at eight, so we should leave soon.",
    "Whales are the largest animals that have ever lived.",
    "Let me know when the package arrives at the front door.",
    "What time is it in Tokyo right now?",
    "The students listened carefully to the teacher.",
    "I think we need to buy a new washing machine.",
    "Could you give me three ideas for a birthday present?",
    "The river flows slowly through the quiet green valley.",
    "Why do cats like to sleep in small boxes?",
    "Switch off the heating when you leave the house.",
    "The doctor told me to rest for a few days.",
    "How far is the moon from the earth?",
    "We watched an old movie and ate popcorn on the sofa.",
    "Thank you very much for your help this afternoon.",
]
MANDARIN = ["今天天气很好，我们去公园散步吧。", "你叫什么名字？", "请帮我订一张明天去北京的火车票。",
            "我喜欢喝茶，不喜欢喝咖啡。", "这本书非常有意思。"]
RATE = 16000


def _utts(voice: str, n: int, prefix: str, **settings) -> list[synth.Utterance]:
    return [synth.make_utterance({"id": f"{prefix}{i:03d}", "text": t, "voice": voice, **settings})
            for i, t in enumerate(SENTENCES[:n])]


def _median_f0(wav: np.ndarray) -> float:
    import librosa

    f0, voiced, _ = librosa.pyin(wav, fmin=60, fmax=500, sr=RATE, frame_length=1024)
    return float(np.median(f0[voiced]))


def _true_span(wav: np.ndarray) -> tuple[float, float]:
    frames = wav[: wav.shape[0] // 160 * 160].reshape(-1, 160)  # 10 ms frames
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
    active = np.nonzero(rms > 0.01 * rms.max())[0]  # within 40 dB of the loudest frame
    return active[0] * 0.01, (active[-1] + 1) * 0.01


def bench_engine(voice: str, args, judges: dict[str, AsrJudge], work: Path) -> None:
    print(f"\n== {voice}: {args.n} English sentences, {RATE} Hz")
    utts = _utts(voice, args.n, "s")
    speeds = []
    for workers in (1, args.workers):
        report = synth.synthesize_many(utts, work / f"{voice}-{workers}", workers=workers, progress=False)
        speeds.append((workers, report.audio_seconds, report.wall_seconds))
        print(f"synthesis, {workers} process(es): {report.audio_seconds:.1f} s of audio in {report.wall_seconds:.1f} s"
              f" = {report.audio_seconds / report.wall_seconds:.1f} audio-s/s")
    manifest = work / f"{voice}-1" / "manifest.jsonl"
    for name, judge in judges.items():
        start = time.perf_counter()
        scored = judge.score(manifest)
        wall = time.perf_counter() - start
        print(f"ASR judge {name}: WER {100 * scored['wer']:.2f} %  CER {100 * scored['cer']:.2f} %  "
              f"({scored['n']} utterances, {wall / scored['n']:.2f} s each)")
        for item in scored["items"]:
            if item["wer"]:
                print(f"    {item['wer']:.2f}  ref {item['reference']!r}  hyp {item['hypothesis']!r}")

    k = min(args.n, 10)
    normal = [synth.synthesize(u, RATE).shape[0] for u in utts[:k]]
    fast = [synth.synthesize(u, RATE).shape[0] for u in _utts(voice, k, "f", rate=1.5)]
    ratios = np.array(fast) / np.array(normal)
    print(f"rate 1.5: duration x{ratios.mean():.3f} (min {ratios.min():.3f}, max {ratios.max():.3f}) over {k}; "
          f"shortened by {100 * (1 - ratios.max()):.1f} % at least")
    k = min(args.n, 5)
    f0 = [(_median_f0(synth.synthesize(u, RATE)), _median_f0(synth.synthesize(p, RATE)))
          for u, p in zip(utts[:k], _utts(voice, k, "p", pitch=4.0))]
    f0_ratio = np.array([up / base for base, up in f0])
    print(f"pitch +4 semitones (x1.260): median F0 x{f0_ratio.mean():.3f} (min {f0_ratio.min():.3f}) over {k}; "
          f"base F0 {np.mean([b for b, _ in f0]):.0f} Hz")

    errors = []
    for _, path, text in read_manifest(manifest):
        wav = load_audio(path, RATE)
        start, end = _true_span(wav)
        silence = np.zeros(RATE, np.float32)
        segments = speech_segments(np.concatenate([silence, wav, silence]), RATE, pad_ms=0)
        errors.append((segments[0][0] - 1 - start, segments[-1][1] - 1 - end) if segments else (np.inf, np.inf))
        if max(abs(errors[-1][0]), abs(errors[-1][1])) > 0.1:
            print(f"    VAD off by {1000 * errors[-1][0]:+.0f} / {1000 * errors[-1][1]:+.0f} ms: {text!r}")
    errors_ms = 1000 * np.abs(np.array(errors))
    print(f"VAD span error (1 s silence each side, pad 0): start mean {errors_ms[:, 0].mean():.0f} ms max "
          f"{errors_ms[:, 0].max():.0f} ms; end mean {errors_ms[:, 1].mean():.0f} ms max {errors_ms[:, 1].max():.0f} "
          f"ms; {100 * np.mean(errors_ms.max(axis=1) <= 100):.0f} % of utterances within 100 ms")


def bench_mandarin() -> None:
    print("\n== espeak-ng 1.52 Mandarin (cmn)")
    engine = synth._engine("espeak")
    start = time.perf_counter()
    wavs = [synth.synthesize(synth.make_utterance({"id": "zh", "text": t, "lang": "zh"}), RATE) for t in MANDARIN]
    wall = time.perf_counter() - start
    syllables = [sum(ch.isalpha() for ch in t) for t in MANDARIN]
    per_syllable = [w.shape[0] / RATE / n for w, n in zip(wavs, syllables)]
    total = sum(w.shape[0] for w in wavs) / RATE
    print(f"library {engine.version}: {total:.1f} s of audio for {sum(syllables)} syllables "
          f"({min(per_syllable):.2f}-{max(per_syllable):.2f} s per syllable), {total / wall:.0f} audio-s/s")


def bench_augment() -> None:
    print("\n== augmentation")
    rng = np.random.default_rng(0)
    clean = [synth.synthesize(u, RATE) for u in _utts("espeak:en-us", 10, "a")]
    worst = 0.0
    for wav in clean:
        for color in augment.NOISE_COLORS:
            for snr in (0.0, 5.0, 10.0, 20.0, 30.0):
                noisy = augment.add_noise(wav, snr, rng, color)
                measured = 10 * np.log10(np.sum(wav.astype(np.float64) ** 2)
                                         / np.sum((noisy - wav).astype(np.float64) ** 2))
                worst = max(worst, abs(measured - snr))
    print(f"noise: largest |measured - requested SNR| over 10 clips x 2 colors x 5 SNRs: {worst:.3f} dB")
    for rate in (16000, 24000):
        wav = synth.synthesize(synth.make_utterance({"id": "t", "text": SENTENCES[0], "voice": "espeak:en-us"}), rate)
        spectrum = np.abs(np.fft.rfft(augment.telephone(wav, rate))) ** 2
        freqs = np.fft.rfftfreq(wav.shape[0], 1 / rate)
        above = spectrum[freqs > 4000].sum() / spectrum.sum()
        print(f"telephone at {rate} Hz: energy above 4 kHz = {above:.1e} of the total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="sentences per engine (at most 50)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the parallel synthesis run")
    parser.add_argument("--decoding", action="store_true", help="also judge with beam 1 and with float32")
    args = parser.parse_args()
    print(machine_line())
    args.n = min(args.n, len(SENTENCES))
    print(f"{os.cpu_count()}-core CPU, load average {os.getloadavg()[0]:.1f}")
    judges = {"int8 beam 5": AsrJudge()}
    if args.decoding:
        judges["int8 beam 1"] = AsrJudge(beam_size=1)
        judges["float32 beam 5"] = AsrJudge(compute_type="float32")
    with tempfile.TemporaryDirectory() as tmp:
        for voice in ("piper", "espeak:en-us"):
            bench_engine(voice, args, judges, Path(tmp))
    bench_mandarin()
    bench_augment()


if __name__ == "__main__":
    main()

"""N concurrent realtime voice sessions against a real `funaudiochat serve` on loopback, against the same N served
one at a time.

    .venv/bin/python bench/serve.py [--model tiny|CONFIG.json|DIR] [--detokenizer tiny|DIR] [--sessions 1 4 8 16]
        [--turns 3] [--turn-detection commit|server_vad] [--max-output-tokens 40] [--threads 2] [--budget-s S]

Each session opens `/v1/realtime` and, per turn, speaks the question (Piper, pcm16 24 kHz, 20 ms chunks paced at
real time); with `commit` it then sends `input_audio_buffer.commit` + `response.create` (push-to-talk), with
`server_vad` the server detects the end of speech (its silence_duration_ms is part of the latency, as a user hears it).
Reported, for N sessions together and for the same N one after the other:
- time to first audio (TTFA), p50 / p95 over all turns: end of speech (the last speech sample sent) -> the first
  `response.output_audio.delta` received;
- per-session real-time factor: the session's generating time (end of speech -> response.done, summed over its
  turns) / the seconds of audio it received; below 1 is faster than real time (worst session and median);
- aggregate speech tokens/s: all sessions' speech tokens / the time at least one answer was being generated (the
  union of the end-of-speech -> response.done intervals; the real-time speaking in between is not counted);
- playback gaps: the silence a listener hears inside an answer played in real time from its first delta (each
  delta arriving after the audio before it has played adds the wait; `eval mini-speech` counts them the same way):
  the turns with a gap over 20 ms, and the p95 gap.
At the end, a profile per run from the server's /metrics: seconds in decode steps, prefills and detokenizer rounds
(sessions synthesised per round), which says which part limits the throughput.

`--model`: `tiny` (a random tiny checkpoint), a config.json (random weights of that shape, e.g.
../shared/bench/bench_config.json, with the tiny test tokenizer), or a checkpoint folder (checkpoints/mini-base for
the mini shape; with `--random-weights`, its shape with random weights, so that answers run to the token limit).
`--detokenizer`: `tiny` (random tiny CosyVoice3) or a CosyVoice3 folder. Traffic stays on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from machine import machine_line  # bench/machine.py: CPU model and SIMD flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ holds the tiny checkpoint and detokenizer makers and the Piper question

from funaudiochat.eval.mini_speech import GAP_HEARD_S, playback_gap  # noqa: E402  (the eval's own measure)

RATE, CHUNK = 24000, 480  # pcm16 24 kHz, 20 ms per append


# ------------------------------------------------------------------------------------------ model and server
def prepare_model(spec: str, folder: Path, random_weights: bool = False) -> Path:
    if Path(spec).is_dir() and not random_weights:
        return Path(spec)
    import shutil

    import torch

    from funaudiochat.config import FunAudioChatConfig
    from funaudiochat.model.checkpoint import save_model
    from funaudiochat.model.funaudiochat import FunAudioChatModel
    from funaudiochat.model.presets import tiny
    from tests.helpers import make_tiny_tokenizer

    source = Path(spec) if Path(spec).is_dir() else None  # its shape and tokenizer files, random weights
    if source is not None:
        cfg, std = FunAudioChatConfig.load(source), 0.02
    else:  # large init: varied text and speech tokens, answers that do not end at once
        cfg, std = tiny() if spec == "tiny" else FunAudioChatConfig.from_dict(json.loads(Path(spec).read_text())), 0.3
    torch.manual_seed(0)
    model = FunAudioChatModel(cfg)
    model.init_weights(std)
    out = folder / "ckpt"
    save_model(model, out)
    if source is None:
        make_tiny_tokenizer(out)
    else:
        for f in source.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and not (out / f.name).exists():
                shutil.copy(f, out)
    return out


def prepare_detokenizer(spec: str, folder: Path) -> Path:
    if spec != "tiny":
        return Path(spec)
    from tests.helpers import write_tiny_detokenizer

    return write_tiny_detokenizer(folder / "detok")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, detok: Path, args, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "funaudiochat.cli", "serve", "--model", str(model), "--detokenizer", str(detok),
           "--host", "127.0.0.1", "--port", str(port), "--threads", str(args.threads),
           "--max-sessions", str(max(args.sessions)), "--max-waiting", str(2 * max(args.sessions)),
           "--wait-timeout", "300", "--max-seq-len", str(args.max_seq_len),
           "--allow-untrained",  # the bench measures cost: random or untrained parts answer too
           "--dtype", args.dtype, "--decode-weights", args.decode_weights] + (["--compile"] if args.compile else [])
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_s = 1200 if args.compile else 300  # (with --compile, /ready waits for the server's warm-up compiles)
    deadline = time.monotonic() + wait_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"bench/serve.py: error: the server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as r:
                if r.status == 200:
                    return proc, url.replace("http://", "ws://")
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"bench/serve.py: error: the server did not come up in {wait_s} s:\n{log.read_text()}")
        time.sleep(0.3)


# ------------------------------------------------------------------------------------------ one session
def pcm16(samples: np.ndarray) -> str:
    return base64.b64encode((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()).decode()


async def speak(ws, samples: np.ndarray) -> float:
    """Append `samples` in 20 ms chunks paced at real time; -> monotonic time the last chunk was sent."""
    start = time.monotonic()
    for i in range(0, len(samples), CHUNK):
        ahead = start + i / RATE - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16(samples[i:i + CHUNK])}))
    return time.monotonic()


async def session(ws_url: str, question: np.ndarray, silence: np.ndarray, args) -> list[dict]:
    """One conversation of `args.turns` spoken turns; -> per turn {ttfa, gen_start, gen_end, audio_s, tokens}."""
    import websockets

    vad = args.turn_detection == "server_vad"
    async with websockets.connect(ws_url + "/v1/realtime", max_size=2 ** 24, open_timeout=60) as ws:
        async def next_event(*kinds: str) -> dict:
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), args.turn_timeout))
                if event["type"] == "error":
                    raise RuntimeError(f"server error: {event['error']}")
                if event["type"] in kinds:
                    return event

        await next_event("session.created")
        turn_detection = {"type": "server_vad", "silence_duration_ms": args.silence_ms} if vad else None
        await ws.send(json.dumps({"type": "session.update", "session": {
            "turn_detection": turn_detection, "max_response_output_tokens": args.max_output_tokens}}))
        await next_event("session.updated")
        turns = []
        for _ in range(args.turns):
            end_of_speech = await speak(ws, question)
            if vad:
                trailing = asyncio.create_task(speak(ws, silence))  # the mic keeps sending silence
            else:
                await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                await ws.send(json.dumps({"type": "response.create"}))
            first, samples, arrivals = None, 0, []
            while True:
                event = await next_event("response.output_audio.delta", "response.done")
                if event["type"] == "response.done":
                    break
                first = first or time.monotonic()
                delta = len(base64.b64decode(event["delta"])) // 2
                samples += delta
                arrivals.append((time.monotonic(), delta / RATE))
            done = time.monotonic()
            if vad:
                await trailing
            status = event["response"]["status"]
            if status not in ("completed", "incomplete"):
                raise RuntimeError(f"response {status}: {event['response'].get('status_details')}")
            usage = event["response"].get("usage") or {}
            turns.append({"ttfa": (first - end_of_speech) if first else None, "gen_start": end_of_speech,
                          "gen_end": done, "audio_s": samples / RATE, "gap": playback_gap(arrivals),
                          "tokens": usage.get("output_token_details", {}).get("audio_tokens", 0)})
        return turns


# ------------------------------------------------------------------------------------------ runs and figures
def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarise(sessions: list[list[dict]]) -> dict:
    turns = [t for s in sessions for t in s]
    ttfa = [t["ttfa"] for t in turns if t["ttfa"] is not None]
    rtf = [sum(t["gen_end"] - t["gen_start"] for t in s) / max(1e-9, sum(t["audio_s"] for t in s)) for s in sessions]
    busy = union_seconds([(t["gen_start"], t["gen_end"]) for t in turns])
    gaps = [t["gap"] for t in turns if t["ttfa"] is not None]
    return {"ttfa_p50": percentile(ttfa, 50), "ttfa_p95": percentile(ttfa, 95), "rtf_median": statistics.median(rtf),
            "rtf_worst": max(rtf), "tokens_per_s": sum(t["tokens"] for t in turns) / busy if busy else 0.0,
            "no_audio": sum(t["ttfa"] is None for t in turns), "gap_turns": sum(g > GAP_HEARD_S for g in gaps),
            "turns": len(gaps), "gap_p95": percentile(gaps, 95)}


async def run(ws_url: str, n: int, together: bool, question, silence, args) -> dict:
    if together:
        sessions = await asyncio.gather(*(session(ws_url, question, silence, args) for _ in range(n)))
    else:
        sessions = [await session(ws_url, question, silence, args) for _ in range(n)]
    return summarise(list(sessions))


PROFILE = {"decode": "funaudiochat_decode_step_seconds", "prefill": "funaudiochat_prefill_seconds",
           "encode": "funaudiochat_audio_encode_seconds", "detokenizer": "funaudiochat_detokenizer_round_seconds",
           "rounds": "funaudiochat_detokenizer_round_sessions"}


def scrape(http_url: str) -> dict:
    """The server's cumulative time in decode steps, prefills and detokenizer rounds (/metrics sums and counts)."""
    with urllib.request.urlopen(http_url + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    values = dict(line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))
    return {k: (float(values.get(f"{name}_sum", 0)), float(values.get(f"{name}_count", 0)))
            for k, name in PROFILE.items()}


def profile(before: dict, after: dict) -> str:
    """Where the server's time went between two scrapes (the engine thread and the detokenizer thread overlap)."""
    d = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in PROFILE}
    sessions, rounds = d["rounds"]
    return (f"server time: decode steps {d['decode'][0]:.1f} s ({d['decode'][1]:.0f} steps), prefill "
            f"{d['prefill'][0]:.1f} s (+ audio encoded together {d['encode'][0]:.1f} s, {d['encode'][1]:.0f} "
            f"times), detokenizer {d['detokenizer'][0]:.1f} s ({rounds:.0f} rounds, "
            f"{sessions / max(1, rounds):.2f} sessions per round)")


def row(n: int, mode: str, s: dict) -> str:
    return (f"| {n:>2} | {mode:<13} | {s['ttfa_p50'] * 1000:7.0f} | {s['ttfa_p95'] * 1000:7.0f} | "
            f"{s['rtf_median']:6.2f} | {s['rtf_worst']:6.2f} | {s['tokens_per_s']:8.1f} | "
            f"{s['gap_turns']:>2} of {s['turns']:<2} | {s['gap_p95'] * 1000:7.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | a config.json (random weights) | a checkpoint folder")
    ap.add_argument("--random-weights", action="store_true",
                    help="a checkpoint folder's shape and tokenizer with random weights (every answer then runs to "
                         "--max-output-tokens, as on the bench config: the cost of long answers, e.g. on the mini shape)")
    ap.add_argument("--detokenizer", default="tiny", help="tiny | a CosyVoice3 folder")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--turn-detection", choices=["commit", "server_vad"], default="commit")
    ap.add_argument("--silence-ms", type=int, default=500, help="server VAD: silence that ends a turn")
    ap.add_argument("--max-output-tokens", type=int, default=40, help="text tokens per answer (speech follows)")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--dtype", default="fp32", help="the server's --dtype (fp32 | bf16 | int8)")
    ap.add_argument("--decode-weights", default="fp32", help="the server's --decode-weights (fp32 | fp16)")
    ap.add_argument("--compile", action="store_true", help="the server's --compile")
    ap.add_argument("--server-log", type=Path, default=None, help="keep the server's output in this file")
    ap.add_argument("--turn-timeout", type=float, default=600.0, help="seconds to wait for any one event")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop before the next N once this many seconds have passed (a bounded run)")
    args = ap.parse_args()
    print(machine_line())

    from tests.serve_support import spoken_question

    question = spoken_question(RATE, silence_before=0.3, silence_after=0.0)
    silence = np.zeros(int(RATE * (args.silence_ms / 1000 + 0.5)), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = prepare_model(args.model, folder, args.random_weights)
        detok = prepare_detokenizer(args.detokenizer, folder)
        proc, ws_url = start_server(model, detok, args, args.server_log or folder / "server.log")
        try:
            print(f"model {args.model}, detokenizer {args.detokenizer}, {args.turns} turns, question "
                  f"{len(question) / RATE:.1f} s, {args.turn_detection}, max {args.max_output_tokens} text tokens "
                  f"per answer, server --threads {args.threads} --dtype {args.dtype} --decode-weights {args.decode_weights}"
                  f"{' --compile' if args.compile else ''} --max-sessions {max(args.sessions)}")
            warm = argparse.Namespace(**{**vars(args), "turns": 1})
            asyncio.run(run(ws_url, 1, True, question, silence, warm))  # first calls build caches and graphs
            if args.compile:  # the graphs of batched steps too (docs/serve.md): steady state is what is measured
                asyncio.run(run(ws_url, max(args.sessions), True, question, silence,
                                argparse.Namespace(**{**vars(args), "turns": 2})))
            print(f"| N | served | TTFA p50 ms | TTFA p95 ms | RTF median | RTF worst | speech tok/s | "
                  f"turns with a gap > {GAP_HEARD_S * 1e3:.0f} ms | gap p95 ms |")
            print("|---|---|---|---|---|---|---|---|---|")
            http_url, started, profiles = ws_url.replace("ws://", "http://"), time.monotonic(), []
            for n in args.sessions:
                if args.budget_s is not None and time.monotonic() - started > args.budget_s:
                    print(f"stopped before N = {n}: the --budget-s of {args.budget_s:g} s is spent")
                    break
                mark = scrape(http_url)
                together = asyncio.run(run(ws_url, n, True, question, silence, args))
                print(row(n, "together", together), flush=True)
                mid = scrape(http_url)
                alone = asyncio.run(run(ws_url, n, False, question, silence, args))
                print(row(n, "one at a time", alone), flush=True)
                profiles += [f"N = {n} together: {profile(mark, mid)}",
                             f"N = {n} one at a time: {profile(mid, scrape(http_url))}"]
                print(f"|    | together / one at a time: {together['tokens_per_s'] / max(1e-9, alone['tokens_per_s']):.2f}"
                      f"x speech tokens/s | | | | | | | |", flush=True)
                if together["no_audio"] or alone["no_audio"]:
                    print(f"note: {together['no_audio'] + alone['no_audio']} turns got no audio (excluded from TTFA)")
            print("\n".join(profiles))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()

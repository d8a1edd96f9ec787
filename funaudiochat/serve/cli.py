"""`funaudiochat serve`: one engine, many conversations, an OpenAI-compatible HTTP API (docs/serve.md).

    funaudiochat serve --model DIR [--detokenizer DIR] [--speaker NAME|FILE] [--voices DIR] [--host 127.0.0.1]
                       [--port 8000] [--api-key KEY] [--max-sessions 8] [--compile] ...

Binds 127.0.0.1 unless told otherwise. The API key may also come from the FUNAUDIOCHAT_API_KEY environment variable.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import time

import torch

from funaudiochat.engine.loading import add_runtime_arguments, check_runtime_arguments, load_runtime
from funaudiochat.errors import InputError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_runtime_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("FUNAUDIOCHAT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $FUNAUDIOCHAT_API_KEY; none: open)")
    g.add_argument("--served-model-name", action="append", default=None,
                   help="model name(s) clients send (default: the model folder's name)")
    g.add_argument("--voices", default=None, help="folder of reference recordings (.wav ...) or 192-d x-vectors "
                                                  "(.pt/.npy) registered as voices by file name")
    g = p.add_argument_group("scheduling and limits")
    g.add_argument("--max-sessions", type=int, default=8, help="sessions decoded together as one batch")
    g.add_argument("--max-waiting", type=int, default=32, help="requests that may wait for a free session")
    g.add_argument("--wait-timeout", type=float, default=10.0,
                   help="seconds a request waits for a free session before a 503")
    g.add_argument("--max-body-mb", type=float, default=25.0, help="largest request body, MiB")
    g.add_argument("--max-audio-seconds", type=float, default=600.0, help="longest audio input per request")
    g.add_argument("--max-messages", type=int, default=256, help="most messages in one chat request")
    g.add_argument("--hop", type=int, default=15, help="speech tokens per streamed audio chunk (15 = 0.6 s)")
    g.add_argument("--max-hop", type=int, default=None,
                   help="later chunks grow up to this many tokens, each twice the one before (fewer context frames "
                        "rendered per second of audio; default: the detokenizer's own, 60 for the mini's Piper "
                        "voice; the CosyVoice3 detokenizer keeps --hop)")
    g.add_argument("--detokenizer-threads", type=int, default=1,
                   help="worker threads turning speech tokens into audio, beside the engine's thread; each "
                        "batches the chunks of the sessions dealt to it")
    g.add_argument("--no-flow-cache", dest="flow_cache", action="store_false",
                   help="re-run each streamed chunk's flow over its whole window instead of keeping the keys and "
                        "values of its completed chunks (less memory per session: the released DiT keeps up to "
                        "about 1.4 GB)")
    g.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt positions prefilled per engine step, between the running sessions' decode steps "
                        "(0: a whole prompt at once)")
    g.add_argument("--no-conversation-cache", dest="conversation_cache", action="store_false",
                   help="prefill every turn of a realtime or /api/chat conversation whole, instead of reusing the "
                        "keys and values of its last completed turn")
    g.add_argument("--conversation-cache-mb", type=float, default=512.0,
                   help="memory for the kept conversations' keys and values, MiB (least recently used dropped)")
    g.add_argument("--max-conversations", type=int, default=64,
                   help="conversations whose last turn's keys and values are kept at most")
    g.add_argument("--early-answer-ms", type=int, default=200,
                   help="realtime server VAD: a turn's audio ends this far into its closing silence, and its answer "
                        "starts once that much silence is heard, while the VAD waits out the rest (0: answers start "
                        "when the VAD ends the turn, which then keeps its whole silence)")
    g.add_argument("--warm-up", default="s2s,s2t",
                   help="with --compile: kinds of requests (s2s spoken answers, s2t text answers; comma-separated, "
                        "or none) whose decode graphs are compiled by synthetic requests at start, before /ready "
                        "(otherwise the first requests of each shape compile them, and every session waits)")


def build_context(args: argparse.Namespace):
    """Load the model and make the ServerContext (shared by the command and tests)."""
    from funaudiochat.serve.app import ServerContext
    from funaudiochat.serve.chat_request import Limits
    from funaudiochat.serve.scheduler import Scheduler
    from funaudiochat.serve.voices import Voices
    from funaudiochat.serve.warm_up import parse_kinds

    check_runtime_arguments(args)  # --device, --threads, --max-seq-len, --detokenizer: as infer and chat check them
    for name in ("max_sessions", "port", "max_messages", "hop", "detokenizer_threads"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("wait_timeout", "max_body_mb", "max_audio_seconds"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name.replace('_', '-')} must be > 0")
    if args.max_waiting < 0:
        raise InputError("--max-waiting must be >= 0")
    if not 0 <= args.early_answer_ms <= 5000:
        raise InputError("--early-answer-ms must be within [0, 5000] (0: no early answers)")
    if args.prefill_chunk < 0:
        raise InputError("--prefill-chunk must be >= 0 (0: whole prompts)")
    if not (0 <= args.conversation_cache_mb < float("inf")) or args.max_conversations < 0:  # (NaN fails the first)
        raise InputError("--conversation-cache-mb must be a finite number >= 0 and --max-conversations >= 0")
    warm_kinds = parse_kinds(args.warm_up)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rt = load_runtime(args.model, args.dtype, args.device, speech=True, detokenizer_dir=args.detokenizer,
                      speaker=args.speaker, max_seq_len=args.max_seq_len, compile=args.compile,
                      decode_weights=args.decode_weights,
                      detokenizer_threads=torch.get_num_threads())  # (it takes turns with the engine: see cpu_turns)
    scheduler = Scheduler(rt.engine, rt.tokenizer, rt.detokenizer, max_sessions=args.max_sessions,
                          max_waiting=args.max_waiting, wait_timeout_s=args.wait_timeout, detokenizer_hop=args.hop,
                          detokenizer_max_hop=args.max_hop,
                          detokenizer_threads=args.detokenizer_threads, prefill_chunk=args.prefill_chunk or None,
                          allow_untrained=args.allow_untrained, conversation_cache=args.conversation_cache,
                          max_conversations=args.max_conversations,
                          max_conversation_bytes=int(args.conversation_cache_mb * 1024 * 1024),
                          flow_cache=args.flow_cache)
    names = args.served_model_name or [args.model.resolve().name]
    return ServerContext(scheduler, names, api_key=args.api_key or None,
                         voices=Voices(rt.detokenizer, args.voices),
                         limits=Limits(max_messages=args.max_messages, max_audio_seconds=args.max_audio_seconds),
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024), created=int(time.time()),
                         warm_up=warm_kinds if args.compile else (),  # (only --compile compiles graphs)
                         early_answer_ms=args.early_answer_ms)


def bind(host: str, port: int) -> socket.socket:
    """Listen on host:port; a taken port or a bad address is a clear error before the model loads."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise InputError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from funaudiochat.serve.app import create_app
    from funaudiochat.serve.openmp import one_thread_here, release_pool_here

    sock = bind(args.host, args.port)
    ctx = build_context(args)
    one_thread_here()  # the main thread's loading work is done: only the engine thread keeps an OpenMP team
    release_pool_here()  # (serve/openmp.py: a second team made every compiled step wait on the kernel)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not ctx.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model",
                    args.host)
    app = create_app(ctx)
    log.info("serving %s on http://%s:%d (OpenAI base_url http://%s:%d/v1)", ", ".join(ctx.served_models),
             args.host, args.port, args.host, args.port)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop
        pass
    return 0

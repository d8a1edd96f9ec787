"""One engine, many conversations: a scheduler that runs every active session's decode step as one batch.

Public interface (what the HTTP API, the realtime WebSocket and `/api/chat` build on):

    scheduler = Scheduler(runtime.engine, runtime.tokenizer, runtime.detokenizer, max_sessions=8)
    scheduler.start()                       # the engine thread; `await scheduler.stop()` / `scheduler.close()` ends it
    session = await scheduler.submit(Request(messages=[{"role": "user", "content": user_content(1)}],
                                             audios=[wav_16k], mode="s2s", voice="中文女"))
    async for event in session:             # the engine's streaming events (funaudiochat.engine.events):
        ...                                 # TextDelta, SpeechGroup, AudioChunk (24 kHz), SpeechEnd, then TurnEnd
    session.cancel()                        # or cancel the consuming task / close the iterator: same effect

- `Request`: the conversation (ChatML messages whose content carries one audio template per audio, the audios as
  16 kHz float32 arrays in order), the mode ("s2s": text + speech, "s2t": text only), an optional system prompt and
  OpenAI-style tools (turned into the released function-calling system prompt), generation overrides of the mode's
  preset (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, do_sample, text_greedy), stop
  strings, the voice (a detokenizer speaker name or a [1, 192] x-vector) and whether to synthesise audio.
- `check_capacity()` raises the 429 at once when the waiting room is full (cheap: call it before decoding uploads).
- `submit` validates and builds the prompt off the event loop (bad input raises `InputError` /
  `ContextLengthError`), then waits in line (first come, first served) for a free batch row: when `max_waiting`
  requests already wait it raises `ServerBusyError` (status 429) at once; after `wait_timeout_s` without a row it
  raises `ServerBusyError` (503). Both carry `retry_after` seconds. A session's row is free again before its
  `TurnEnd` reaches the consumer, so a conversation's next turn never competes with its own previous one.
- A `Session` is an async iterator of events ending with `TurnEnd` (finish_reason "stop", "length" or "cancelled";
  usage with prompt / text / speech token counts and timings; `audio` = the whole answer when audio was made).
  An engine failure ends the iteration with `EngineFailure`. Cancelling (explicit, task cancellation, closing the
  iterator, a matched stop string) frees the batch row and its cache at the next engine step.

How it runs: a dedicated engine thread loops: admit at most one waiting session (its prefill and first token, alone,
exactly as a single run does), then one decode step for each batch of running sessions. Sessions whose settings can
share a step (same mode and sampling parameters; a seeded session always runs alone so its draws are its own) share
a batch. A batch is one `DecodeState` whose rows are right-aligned in a shared cache: a joining row's keys and values
are copied to the slots just before the shared slot (its rope positions stay its own; slots before its first real
position are masked, like left padding), so each row computes what it computes alone (tests/test_scheduler.py).
Rows that finish or are cancelled are dropped before the next step; the cache is repacked (compacted) on every
join or leave, sized for the longest remaining answer.

Per session, text is decoded incrementally and speech codes go to a streaming detokenizer that runs on a worker
thread, so the engine thread only decodes. Queues are bounded: the waiting room by `max_waiting`, each session's
event queue by its `max_new_tokens` (one engine item per step).
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from funaudiochat.engine.events import AudioChunk, IncrementalDecoder, SpeechEnd, SpeechGroup, TextDelta, TurnEnd, Usage
from funaudiochat.engine.generate import DecodeState, Engine, GenerationConfig
from funaudiochat.engine.presets import default_system, generation_preset
from funaudiochat.engine.prompt import Prompt, build_prompt
from funaudiochat.errors import ContextLengthError, FunAudioChatError, InputError
from funaudiochat.model.backbone import KVCache
from funaudiochat.serve.metrics import Metrics
from funaudiochat.text.tools import tools_system_prompt

log = logging.getLogger(__name__)

MODES = ("s2s", "s2t")
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "do_sample",
                   "text_greedy")
_UNBOUNDED = 1 << 40  # a batch's own max_new_tokens: each row's limit is enforced by the scheduler
# streaming detokenizer bounds of the released web demo: each chunk's cost stops growing with the answer's length
FLOW_WINDOW, HIFT_RESET = 200, 500


class ServerBusyError(FunAudioChatError):
    """No batch row is free: `status` 429 (the waiting room is full) or 503 (waited too long); retry later."""

    def __init__(self, message: str, status: int, retry_after: int):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class EngineFailure(FunAudioChatError):
    """The engine failed while running this session (the message says how); the server keeps running."""


@dataclass
class Request:
    messages: list[dict]                        # {"role": "system"|"user"|"assistant", "content": str}
    audios: list = field(default_factory=list)  # 16 kHz float32 mono arrays, one per audio template, in order
    mode: str = "s2s"                           # "s2s" text + speech, "s2t" text only
    system: str | None = None                   # None: the mode's default, unless messages start with a system turn
    tools: list | None = None                   # OpenAI tool definitions -> the function-calling system prompt
    generation: dict = field(default_factory=dict)  # overrides of the mode's preset (GENERATION_KEYS)
    stop: tuple = ()                            # stop strings: the text ends before the first one found
    voice: object = None                        # detokenizer speaker: a name or a [1, 192] x-vector; None = default
    audio_out: bool = True                      # s2s: synthesise audio chunks (needs a detokenizer)


# ---------------------------------------------------------------------------------------------- engine-side rows
@dataclass
class _Row:
    """One session's place in the engine thread."""

    session: "Session"
    gen: GenerationConfig
    max_new: int
    generated: int = 0
    tail: list = field(default_factory=list)   # last ids of prompt + answer (for bad-word prefixes)
    text_ids: list = field(default_factory=list)
    speech_tokens: int = 0
    prefill_s: float = 0.0


def _batch_key(gen: GenerationConfig, seeded_id: str | None):
    """Sessions with equal keys can share one decode step exactly."""
    return (gen.disable_speech, gen.sampling, gen.text_greedy, gen.bad_words_ids, gen.eos_ids, gen.pad_token_id,
            seeded_id)


@dataclass
class _Batch:
    key: tuple
    gen: GenerationConfig
    rows: list[_Row]
    state: DecodeState


# ---------------------------------------------------------------------------------------------- the session
class Session:
    """A submitted request: iterate it for events; `cancel()` stops it at the next engine step."""

    _ids = itertools.count(1)

    def __init__(self, scheduler: "Scheduler", request: Request, prompt: Prompt, gen: GenerationConfig):
        self.id = f"s{next(self._ids)}"
        self.request, self.prompt, self.gen = request, prompt, gen
        self.prompt_tokens = int(prompt.input_ids.shape[1])
        self._scheduler = scheduler
        self._loop = asyncio.get_running_loop()
        self._raw: asyncio.Queue = asyncio.Queue()   # engine items; at most one per step (bounded by max_new_tokens)
        self._out: asyncio.Queue = asyncio.Queue()   # events for the consumer
        self._cancel = threading.Event()
        self._done = False
        self._abandoned = False  # the consumer left before TurnEnd: nothing more is synthesised for it
        self._ended = False      # (engine thread) its last engine item was sent and its row freed
        self.submitted = time.perf_counter()
        self._pump = None

    # -- consumer side
    def cancel(self) -> None:
        """Stop generating (thread-safe); the stream ends with TurnEnd(finish_reason="cancelled")."""
        self._cancel.set()
        self._scheduler._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __aiter__(self):
        return self._events()

    async def _events(self):
        try:
            while True:
                event = await self._out.get()
                if isinstance(event, BaseException):
                    self._done = True
                    raise event
                if isinstance(event, TurnEnd):
                    self._done = True
                yield event
                if self._done:
                    return
        finally:
            if not self._done:  # the consumer left early (closed, cancelled, disconnected)
                self._abandoned = True
                self.cancel()

    # -- engine side (called from the engine thread)
    def _push(self, item) -> None:
        self._loop.call_soon_threadsafe(self._raw.put_nowait, item)


@dataclass
class _Step:
    token: int
    group: tuple | None
    speech_ended: bool


@dataclass
class _Finish:
    reason: str
    text_ids: tuple
    speech_tokens: int
    prefill_s: float


# ---------------------------------------------------------------------------------------------- the scheduler
class Scheduler:
    def __init__(self, engine: Engine, tokenizer, detokenizer=None, *, max_sessions: int = 8, max_waiting: int = 32,
                 wait_timeout_s: float = 10.0, detokenizer_hop: int = 15, detokenizer_threads: int = 1,
                 metrics: Metrics | None = None, frontend=None):
        if max_sessions < 1 or max_waiting < 0:
            raise InputError("max_sessions must be >= 1 and max_waiting >= 0")
        self.engine, self.tokenizer, self.detokenizer = engine, tokenizer, detokenizer
        self.max_sessions, self.max_waiting, self.wait_timeout_s = max_sessions, max_waiting, wait_timeout_s
        self.detokenizer_hop, self.frontend = detokenizer_hop, frontend
        self.metrics = metrics or Metrics()
        self.speech = engine.model.audio_invert_tower is not None
        self._cond = threading.Condition()
        self._inbox: deque[Session] = deque()
        self._batches: dict[tuple, _Batch] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self._free_rows = max_sessions                 # batch rows nobody holds (event loop only)
        self._waiters: deque[asyncio.Future] = deque()  # requests waiting for a row, first come first served
        self._active = 0
        self._detok_pool = ThreadPoolExecutor(max(1, detokenizer_threads), thread_name_prefix="detokenizer")
        self._prep_pool = ThreadPoolExecutor(2, thread_name_prefix="prompt")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._detok_pool.shutdown(wait=False, cancel_futures=True)
        self._prep_pool.shutdown(wait=False, cancel_futures=True)

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active_sessions(self) -> int:
        return self._active

    @property
    def waiting_sessions(self) -> int:
        return len(self._waiters)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ submission
    def prepare(self, request: Request) -> tuple[Prompt, GenerationConfig]:
        """Validate a request and build its prompt and generation settings (blocking; raises InputError)."""
        if request.mode not in MODES:
            raise InputError(f"unknown mode {request.mode!r}; choose one of {', '.join(MODES)}")
        if request.mode == "s2s" and not self.speech:
            raise InputError("this model has no speech head: only text answers (mode s2t) are possible")
        if request.mode == "s2s" and request.audio_out and self.detokenizer is None:
            raise InputError("this server has no detokenizer: audio answers are not available (ask for text only, "
                             "or start the server with --detokenizer)")
        unknown = set(request.generation) - set(GENERATION_KEYS)
        if unknown:
            raise InputError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        messages = [dict(m) for m in request.messages]
        if not messages or not any(m.get("role") == "user" for m in messages):
            raise InputError("a conversation needs at least one user message")
        if messages[0].get("role") != "system":
            system = request.system if request.system is not None else default_system(request.mode)
            if request.tools:
                system = tools_system_prompt(request.tools, base=request.system or default_system("s2t"))
            messages.insert(0, {"role": "system", "content": system})
        elif request.tools:
            messages[0]["content"] = tools_system_prompt(request.tools, base=messages[0]["content"])
        prompt = build_prompt(self.tokenizer, self.engine.cfg, messages, list(request.audios), self.frontend)
        n_prompt = int(prompt.input_ids.shape[1])
        room = self.engine.max_seq_len - n_prompt
        if room < 1:
            raise ContextLengthError(f"the prompt has {n_prompt} tokens, the context holds {self.engine.max_seq_len}; "
                                     f"send shorter audio or fewer messages")
        overrides = {k: v for k, v in request.generation.items() if v is not None}
        asked = overrides.get("max_new_tokens")
        if asked is not None and asked > room:
            raise ContextLengthError(f"prompt of {n_prompt} tokens + max_new_tokens {asked} exceeds the context of "
                                     f"{self.engine.max_seq_len} tokens; lower max_new_tokens to at most {room}")
        gen = generation_preset(request.mode, self.tokenizer, **overrides)
        if asked is None and gen.max_new_tokens > room:
            gen = gen.with_(max_new_tokens=room)
        if not gen.disable_speech and not self.speech:
            gen = gen.with_(disable_speech=True, force_text_abos=False)
        return prompt, gen

    async def submit(self, request: Request) -> Session:
        """Build the prompt, wait (bounded) for a batch row, queue the session for the engine; see module doc."""
        if self._stop or not self.alive:
            raise ServerBusyError("the engine is not running", 503, 5)
        self.check_capacity()  # before building the prompt: a flood costs no feature extraction
        loop = asyncio.get_running_loop()
        prompt, gen = await loop.run_in_executor(self._prep_pool, self.prepare, request)
        await self._acquire_row()
        self._active += 1
        session = Session(self, request, prompt, gen)
        session._pump = asyncio.create_task(self._pump(session))
        with self._cond:
            self._inbox.append(session)
            self._cond.notify_all()
        return session

    def check_capacity(self) -> None:
        """Raise ServerBusyError (429) now if a new request could not even wait (event loop only)."""
        if self._free_rows == 0 and len(self._waiters) >= self.max_waiting:
            self.metrics.rejected.inc()
            raise ServerBusyError(f"all {self.max_sessions} sessions are busy and {len(self._waiters)} requests "
                                  f"already wait; retry later", 429, 2)

    async def _acquire_row(self) -> None:
        """Take a free batch row, or wait in line for one at most `wait_timeout_s` (503 after that)."""
        if self._free_rows > 0 and not self._waiters:
            self._free_rows -= 1
            return
        self.check_capacity()
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.wait_timeout_s)
        except asyncio.TimeoutError:
            if turn.done():  # a row was handed over at the last moment: keep it
                return
            self._waiters.remove(turn)
            self.metrics.rejected.inc()
            raise ServerBusyError(f"no session became free within {self.wait_timeout_s:g} s; retry later", 503,
                                  max(1, int(self.wait_timeout_s))) from None
        except asyncio.CancelledError:  # the client left while waiting
            if turn.done():
                self._release_row()
            else:
                self._waiters.remove(turn)
            raise

    def _release_row(self) -> None:
        """Hand a freed row to the first waiting request (the waiting count drops at once), else keep it free."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free_rows += 1

    def _release(self, session: Session, last_item) -> None:
        """On the event loop, when a session's engine part ended: free its row, then hand on its last item (so a
        client that starts its next turn on seeing the end always finds the row free)."""
        self._active -= 1
        self._release_row()
        session._raw.put_nowait(last_item)

    # ------------------------------------------------------------------ per-session post-processing (event loop)
    async def _pump(self, session: Session) -> None:
        """Engine items -> events: incremental text, speech groups, audio chunks from a worker thread, TurnEnd."""
        req, loop = session.request, asyncio.get_running_loop()
        decoder = IncrementalDecoder(self.tokenizer)
        num_codes = self.engine.cfg.audio_config.num_codes
        detok = None
        make_audio = req.mode == "s2s" and req.audio_out and self.detokenizer is not None
        stops = _StopFilter(req.stop)
        codes, chunks = [], []
        first_text = first_audio = None
        stopped = False
        audio_job = None  # the last detokenizer call: calls run one after another (a session's stream is stateful)

        def emit_audio(pieces):
            nonlocal first_audio
            for chunk in pieces:
                if chunk.size:
                    if first_audio is None:
                        first_audio = time.perf_counter() - session.submitted
                        self.metrics.first_audio.observe(first_audio)
                    chunks.append(chunk)
                    session._out.put_nowait(AudioChunk(chunk, self.detokenizer.sample_rate))

        async def push_codes(new_codes, previous):
            if previous is not None:
                await previous
            if session._abandoned:  # nobody listens any more
                return
            emit_audio(await loop.run_in_executor(self._detok_pool, detok.push, new_codes))

        try:
            if make_audio:
                detok = await loop.run_in_executor(self._detok_pool, functools.partial(
                    self.detokenizer.stream, req.voice, self.detokenizer_hop, flow_window=FLOW_WINDOW,
                    hift_reset=HIFT_RESET))
            while True:
                item = await session._raw.get()
                if isinstance(item, BaseException):
                    session._out.put_nowait(item)
                    return
                if isinstance(item, _Step):
                    if stopped:
                        continue
                    delta = decoder.push(item.token)
                    if delta:
                        delta, stopped = stops.push(delta)
                        if stopped:
                            session.cancel()
                        if delta:
                            first_text = first_text or time.perf_counter() - session.submitted
                            session._out.put_nowait(TextDelta(delta))
                    if item.group is not None:
                        new_codes = tuple(t for t in item.group if 0 <= t < num_codes)
                        codes.extend(new_codes)
                        session._out.put_nowait(SpeechGroup(item.group, new_codes))
                        if detok is not None and new_codes:
                            audio_job = asyncio.ensure_future(push_codes(list(new_codes), audio_job))
                        if item.speech_ended:
                            session._out.put_nowait(SpeechEnd())
                    continue
                # _Finish
                if audio_job is not None:
                    await audio_job
                if detok is not None and codes and not session._abandoned:
                    emit_audio([await loop.run_in_executor(self._detok_pool, detok.finalize)])
                held = stops.flush()
                if held:
                    session._out.put_nowait(TextDelta(held))
                reason = "stop" if stopped else item.reason
                usage = Usage(session.prompt_tokens, len(item.text_ids), item.speech_tokens, item.prefill_s,
                              first_text, first_audio, time.perf_counter() - session.submitted)
                final_text = stops.text if stopped else self.tokenizer.decode(item.text_ids)
                session._out.put_nowait(TurnEnd(final_text, item.text_ids, tuple(codes), reason, usage,
                                                np.concatenate(chunks) if chunks else None))
                return
        except Exception as err:  # a detokenizer failure ends this session only
            log.exception("session %s failed", session.id)
            session.cancel()
            session._out.put_nowait(EngineFailure(f"synthesising the answer failed: {err}"))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stop and not self._inbox and not self._batches:
                    self._cond.wait()
                if self._stop:
                    break
                new = self._inbox.popleft() if self._inbox else None
            if new is not None:
                try:
                    self._admit(new)
                except Exception as err:  # the engine failed on this prompt: it alone ends
                    log.exception("prefill of session %s failed", new.id)
                    self._end(new, EngineFailure(f"the engine failed on this request: {err}"))
            for batch in list(self._batches.values()):
                try:
                    self._step(batch)
                except Exception as err:  # a failed step ends the sessions of its batch; the others go on
                    log.exception("a decode step failed; ending its %d session(s)", len(batch.rows))
                    self._batches.pop(batch.key, None)
                    for row in batch.rows:
                        self._end(row.session, EngineFailure(f"the engine failed during generation: {err}"))
        for batch in list(self._batches.values()):  # shutting down: end every running session
            for row in batch.rows:
                self._finish(row, "cancelled")
        while self._inbox:
            self._end(self._inbox.popleft(), EngineFailure("the server is shutting down"))

    def _end(self, session: Session, item) -> None:
        """The session's last engine item (a _Finish or an EngineFailure); frees its row. Idempotent."""
        if session._ended:
            return
        session._ended = True
        session._loop.call_soon_threadsafe(self._release, session, item)

    def _admit(self, session: Session) -> None:
        """Prefill a new session alone, choose its first token, then let it join a batch."""
        if session.cancelled:
            self._end(session, _Finish("cancelled", (), 0, 0.0))
            return
        gen = session.gen
        t0 = time.perf_counter()
        state, logits, group = self.engine.prefill(session.prompt, gen)
        result = self.engine.choose_step(state, logits, group, gen)
        self.metrics.prefill_seconds.observe(time.perf_counter() - t0)
        ids = session.prompt.input_ids[0].tolist()
        row = _Row(session, gen, gen.max_new_tokens, tail=ids[-self._tail_len(gen):],
                   prefill_s=state.timings.get("prefill_s", 0.0))
        self._emit(row, result, 0)
        if self._row_done(row):
            return
        key = _batch_key(gen, session.id if gen.seed is not None and gen.do_sample else None)
        batch = self._batches.get(key)
        if batch is None:
            batched_gen = gen.with_(max_new_tokens=_UNBOUNDED, force_text_abos=False, seed=None)
            self._batches[key] = _Batch(key, batched_gen, [row], self._repack([(state, 0)], [row]))
        else:
            rows = batch.rows + [row]
            batch.state = self._repack([(batch.state, i) for i in range(len(batch.rows))] + [(state, 0)], rows)
            batch.rows = rows

    @staticmethod
    def _tail_len(gen: GenerationConfig) -> int:
        return max([len(seq) for seq in gen.bad_words_ids] + [1])

    def _step(self, batch: _Batch) -> None:
        cancelled = [i for i, row in enumerate(batch.rows) if row.session.cancelled]
        if cancelled:
            for i in cancelled:
                self._finish(batch.rows[i], "cancelled")
            self._drop(batch, set(cancelled))
            if not batch.rows:
                return
        state = batch.state
        state.tokens, state.speech = [], [[] for _ in batch.rows]
        if batch.gen.bad_words_ids:  # the history the bad-word check reads: each row's last ids
            state.prompt_ids = torch.tensor([row.tail for row in batch.rows], device=self.engine.device)
        t0 = time.perf_counter()
        logits, group = self.engine.forward_step(state, batch.gen)
        result = self.engine.choose_step(state, logits, group, batch.gen)
        self.metrics.step_seconds.observe(time.perf_counter() - t0)
        self.metrics.batch_rows.observe(len(batch.rows))
        done = set()
        for i, row in enumerate(batch.rows):
            self._emit(row, result, i)
            if self._row_done(row):
                done.add(i)
        if done:
            self._drop(batch, done)

    def _emit(self, row: _Row, result, i: int) -> None:
        token = int(result.text[i])
        group = None
        if result.speech is not None and bool(result.speech_mask[i]):
            group = tuple(int(t) for t in result.speech[i])
            row.speech_tokens += len(group)
        row.generated += 1
        row.text_ids.append(token)
        row.tail = (row.tail + [token])[-len(row.tail or [0]):]
        self.metrics.tokens.inc(1 + (len(group) if group else 0))
        row.session._push(_Step(token, group, bool(result.speech_ended[i])))

    def _row_done(self, row: _Row) -> bool:
        """Finish the row if its answer is complete -> True."""
        if row.text_ids[-1] in row.gen.eos_ids:
            self._finish(row, "stop")
            return True
        if row.generated >= row.max_new:
            self._finish(row, "length")
            return True
        return False

    def _finish(self, row: _Row, reason: str) -> None:
        self._end(row.session, _Finish(reason, tuple(row.text_ids), row.speech_tokens, row.prefill_s))

    def _drop(self, batch: _Batch, gone: set[int]) -> None:
        keep = [i for i in range(len(batch.rows)) if i not in gone]
        if not keep:
            del self._batches[batch.key]
            return
        rows = [batch.rows[i] for i in keep]
        batch.state = self._repack([(batch.state, i) for i in keep], rows)
        batch.rows = rows

    # ------------------------------------------------------------------ batch state surgery
    def _repack(self, parts: list[tuple[DecodeState, int]], rows: list[_Row]) -> DecodeState:
        """Rows (state, row index) -> one DecodeState, each row's cache right-aligned to a shared slot.

        A row's cached positions are the valid slots just before its state's slot (contiguous: only left padding is
        ever masked). The new slot T is the longest row; the cache holds T + the largest number of steps any row
        may still take."""
        eng, k = self.engine, self.engine.k
        dev = eng.device
        lengths = [int(st.key_valid[r, :st.slot].sum()) for st, r in parts]
        slot = max(lengths)
        size = slot + max(row.max_new - row.generated for row in rows) + 1
        if eng.compiled is not None:  # compiled graphs are specialised on the cache size: few sizes
            size = -(-size // 128) * 128
        b = len(parts)
        first = parts[0][0]
        llm = KVCache(eng.cfg.text_config, b, size, eng.dtype, dev)
        key_valid = torch.zeros(b, size, dtype=torch.bool, device=dev)
        speech = first.srh_cache is not None
        srh = KVCache(eng.cfg.audio_config.crq_transformer_config, b, k * size, eng.dtype, dev) if speech else None
        srh_valid = torch.zeros(b, k * size, dtype=torch.bool, device=dev) if speech else None
        for i, ((st, r), n) in enumerate(zip(parts, lengths)):
            src, dst = slice(st.slot - n, st.slot), slice(slot - n, slot)
            for new, old in ((llm.k, st.llm_cache.k), (llm.v, st.llm_cache.v)):
                for layer_new, layer_old in zip(new, old):
                    layer_new[i, :, dst] = layer_old[r, :, src]
            key_valid[i, dst] = True
            if speech:
                s_src, s_dst = slice(k * src.start, k * src.stop), slice(k * dst.start, k * dst.stop)
                for new, old in ((srh.k, st.srh_cache.k), (srh.v, st.srh_cache.v)):
                    for layer_new, layer_old in zip(new, old):
                        layer_new[i, :, s_dst] = layer_old[r, :, s_src]
                srh_valid[i, s_dst] = True

        def cat(name):
            values = [getattr(st, name) for st, _ in parts]
            if values[0] is None:
                return None
            return torch.cat([v[r:r + 1] for v, (_, r) in zip(values, parts)])

        state = DecodeState(llm, srh, key_valid, srh_valid if speech else torch.zeros(0), cat("pos"), slot,
                            torch.tensor([row.tail for row in rows], device=dev), padded=True,
                            speech=[[] for _ in rows])
        for name in ("last_token", "last_group", "fuse", "active", "finished", "srh_embed", "text_counts",
                     "speech_counts"):
            setattr(state, name, cat(name))
        state.generator = first.generator  # only a seeded session's own batch (one row) has one
        return state


class _StopFilter:
    """Stop strings on streamed text: text that may still become a stop string is held back until it cannot."""

    def __init__(self, stops):
        self.stops = [x for x in stops if x]
        self.text, self.sent = "", 0

    def push(self, delta: str) -> tuple[str, bool]:
        """-> (text safe to send now, a stop string was found: the text ends before it)."""
        self.text += delta
        hits = [i for i in (self.text.find(x, self.sent) for x in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self.flush(), True
        hold = max((n for x in self.stops for n in range(len(x) - 1, 0, -1) if self.text.endswith(x[:n])),
                   default=0)
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

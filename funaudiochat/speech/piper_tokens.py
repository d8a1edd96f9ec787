"""Phonetic speech tokens at 25 Hz for fun-audio-chat-mini's voice (the packaged Piper joe voice), and the tokenizer.

Each token describes one 40 ms frame: the phonetic *unit* being spoken, whether the frame starts the unit or
continues it, and a loudness level:

    token = ((gain * NUM_UNITS) + unit) * 2 + cont      cont: 0 = first frame of the unit, 1 = a later frame
                                                        gain: 0 normal, 1 loud, 2 quiet (GAIN_DB)

A unit is a short run of the voice's phoneme symbols: a vowel or diphthong with its stress mark and length /
palatal marks, any other symbol alone, each optionally followed by the word space; "^" and "$" (sentence start
and end) are units too. The inventory (`UNITS`) is fixed here, so tokens mean the same thing in every model.
Every symbol alone is a unit, so any phoneme string splits into units (greedy longest match), and the split is
exact both ways: units -> symbols -> the voice's phoneme ids, each symbol followed by the pad id "_" as piper
writes it (none after "$").

Timing: token k starts at voice frame F(k) = round(k * 22050 / 256 / 25) (3.445 frames of 256 samples per token).
A unit spanning tokens [a, b) gets the frames [F(a), F(b)); inside the unit, frames go to its phoneme ids in
proportion to fixed weights (`ID_WEIGHTS`, the voice's mean duration of each kind of id), so tokens alone fix
every id's frames. The tokenizer takes the voice's own durations (its duration predictor, with its noise drawn
from a seed) and rounds each unit's end to the nearest token boundary, at least one token per unit, so rounding
errors never accumulate.

    tok = PiperTokenizer()                       # cuts the voice's ONNX parts (seconds)
    tokens = tok.tokenize("Hello! How are you?", speed=1.0, gain="normal")
    spans = unit_spans(tokens)                   # [UnitSpan(unit, start, end, gains)], validated
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from funaudiochat.errors import InputError

log = logging.getLogger(__name__)

# The voice's 150 symbols in id order (id 1 .. 150; id 0 is the pad "_"), from its phoneme_id_map.
SYMBOLS = ("^$ !'(),-.:;?abcdefhijklmnopqrstuvwxyz\xe6\xe7\xf0\xf8\u0127\u014b\u0153\u01c0\u01c1\u01c2\u01c3"
           "\u0250\u0251\u0252\u0253\u0254\u0255\u0256\u0257\u0258\u0259\u025a\u025b\u025c\u025e\u025f\u0260"
           "\u0261\u0262\u0263\u0264\u0265\u0266\u0267\u0268\u026a\u026b\u026c\u026d\u026e\u026f\u0270\u0271"
           "\u0272\u0273\u0274\u0275\u0276\u0278\u0279\u027a\u027b\u027d\u027e\u0280\u0281\u0282\u0283\u0284"
           "\u0288\u0289\u028a\u028b\u028c\u028d\u028e\u028f\u0290\u0291\u0292\u0294\u0295\u0298\u0299\u029b"
           "\u029c\u029d\u029f\u02a1\u02a2\u02b2\u02c8\u02cc\u02d0\u02d1\u02de\u03b2\u03b8\u03c7\u1d7b\u2c71"
           "0123456789\u0327\u0303\u032a\u032f\u0329\u02b0\u02e4\u03b5\u2193#\"")
PAD, BOS, EOS, SPACE = "_", "^", "$", " "
STRESS = ("", "ˈ", "ˌ")
VOWEL_SUFFIXES = ("", "ː", "ʲ", "ːʲ")
# the vowels and diphthongs espeak-ng en-us writes (other vowels are still units, alone)
VOWEL_CORES = ("ɪ", "ə", "æ", "ɛ", "i", "ɐ", "ʌ", "a", "ʊ", "e", "ɔ", "ɚ", "ɑ", "u", "ᵻ", "o", "ɜ",
               "aɪ", "aʊ", "eɪ", "oʊ", "ɔɪ")


def _build_units() -> tuple[str, ...]:
    units = list(SYMBOLS)
    for core in VOWEL_CORES:
        for stress in STRESS:
            for suffix in VOWEL_SUFFIXES:
                unit = stress + core + suffix
                if unit not in units:
                    units.append(unit)
    return tuple(units + [u + SPACE for u in units if u not in (SPACE, EOS)])


UNITS = _build_units()
NUM_UNITS = len(UNITS)
UNIT_INDEX = {u: i for i, u in enumerate(UNITS)}
MAX_UNIT_LEN = max(len(u) for u in UNITS)
GAINS = ("normal", "loud", "quiet")
GAIN_DB = (0.0, 5.0, -6.0)
VOCAB_SIZE = len(GAINS) * NUM_UNITS * 2  # 792 units -> 4752 codes, within the mini's 6561

TOKEN_RATE = 25
VOICE_RATE, VOICE_HOP = 22050, 256
# mean frames the voice gives each kind of id (its duration predictor on 300 of the mini's answers)
ID_WEIGHTS = {"consonant": 2.1, "vowel": 2.2, "stress": 2.4, "mark": 1.9, "space": 2.5, "punctuation": 4.8,
              BOS: 3.6, EOS: 4.5, "pad": 2.05, "pad after stress": 2.55, "pad after punctuation": 4.2}
PUNCTUATION = set("!'(),-.:;?\"")
MARKS = set("ːˑʲ˞ʰˤ\u0327\u0303\u032a\u032f\u0329")
_UNSAID = PUNCTUATION | set(STRESS[1:]) | {BOS, EOS, SPACE}
VOWELS = set("aeiouyæøœɐɑɒɔɘəɚɛɜɞɤɨɪɯɵɶʉʊʌʏᵻ")
# units the voice says nothing in: the sentence marks, the word space alone, punctuation (pauses)
SILENT_UNITS = frozenset(i for i, u in enumerate(UNITS)
                         if u.rstrip(SPACE) in (BOS, EOS) or set(u.rstrip(SPACE)) <= PUNCTUATION)


def frame_of_token(k):
    """First voice frame of token k (int or int array): round(k * 22050 / 6400), halves up."""
    return (np.asarray(k, dtype=np.int64) * 2 * VOICE_RATE + VOICE_HOP * TOKEN_RATE) // (2 * VOICE_HOP * TOKEN_RATE)


def token_of_frame(f):
    """The token boundary nearest to voice frame boundary f (int or int array), halves up."""
    return (np.asarray(f, dtype=np.int64) * 2 * VOICE_HOP * TOKEN_RATE + VOICE_RATE) // (2 * VOICE_RATE)


# ------------------------------------------------------------------ symbols <-> units <-> ids


def units_of_symbols(symbols: list[str] | str) -> list[int]:
    """Phoneme symbols -> unit indices (greedy longest match). Unknown symbols are dropped, as piper does."""
    text = "".join(s for s in symbols if s in UNIT_INDEX or _warn_unknown(s))
    units, i = [], 0
    while i < len(text):
        for length in range(min(MAX_UNIT_LEN, len(text) - i), 0, -1):
            unit = UNIT_INDEX.get(text[i:i + length])
            if unit is not None:
                units.append(unit)
                i += length
                break
    return units


def _warn_unknown(symbol: str) -> bool:
    log.warning("phoneme %r is not in the Piper voice's symbols; dropped", symbol)
    return False


def sentence_units(symbols: list[str]) -> list[int]:
    """One sentence's phoneme symbols -> units with the sentence marks "^" ... "$" around them."""
    return [UNIT_INDEX[BOS]] + units_of_symbols(symbols) + [UNIT_INDEX[EOS]]


def unit_ids(unit: int, symbol_ids: dict[str, int]) -> list[int]:
    """A unit -> the voice's phoneme ids: each symbol, then the pad (no pad after "$")."""
    ids = []
    for sym in UNITS[unit]:
        ids.append(symbol_ids[sym])
        if sym != EOS:
            ids.append(symbol_ids[PAD])
    return ids


def unit_id_weights(unit: int) -> list[float]:
    """Relative frames of each id of `unit` (in `unit_ids` order)."""
    weights = []
    for sym in UNITS[unit]:
        if sym in (BOS, EOS):
            kind = sym
        elif sym == SPACE:
            kind = "space"
        elif sym in STRESS:
            kind = "stress"
        elif sym in PUNCTUATION:
            kind = "punctuation"
        elif sym in MARKS:
            kind = "mark"
        else:
            kind = "vowel" if sym in VOWELS else "consonant"
        weights.append(ID_WEIGHTS[kind])
        if sym != EOS:
            weights.append(ID_WEIGHTS["pad after " + kind] if "pad after " + kind in ID_WEIGHTS
                           else ID_WEIGHTS["pad"])
    return weights


def split_frames(total: int, weights: list[float]) -> np.ndarray:
    """`total` frames shared out in proportion to `weights` (cumulative rounding: the counts sum to `total`)."""
    edges = np.floor(np.cumsum(weights) / sum(weights) * total + 0.5).astype(np.int64)
    edges[-1] = total
    return np.diff(edges, prepend=0)


# ------------------------------------------------------------------ tokens


@dataclass(frozen=True)
class UnitSpan:
    unit: int  # index in UNITS
    start: int  # first token
    end: int  # one past the last token
    gains: tuple[int, ...]  # gain level of each token


def encode(units: list[int], token_ends: list[int], gains=0) -> list[int]:
    """Units with their token end boundaries (strictly increasing, from 0) -> tokens. `gains`: one level for all
    tokens or one per token."""
    n = token_ends[-1] if token_ends else 0
    gain = np.broadcast_to(np.asarray(gains, dtype=np.int64), (n,))
    tokens, start = [], 0
    for unit, end in zip(units, token_ends):
        if end <= start:
            raise InputError(f"unit {UNITS[unit]!r} ends at token {end}, not after its start {start}")
        for k in range(start, end):
            tokens.append(int(((gain[k] * NUM_UNITS) + unit) * 2 + (k > start)))
        start = end
    return tokens


def _as_ints(tokens) -> np.ndarray:
    """Any integer sequence -> int64 [N], or a clear error."""
    try:
        t = np.asarray(tokens)
        if t.dtype == object or t.dtype.kind not in "iuf":
            raise TypeError(f"dtype {t.dtype}")
        t = t.reshape(-1)
    except (TypeError, ValueError) as err:
        raise InputError(f"speech tokens must be a sequence of integers ({err})") from None
    if t.dtype.kind == "f" and not np.array_equal(t, np.round(t)):
        raise InputError("speech tokens must be integers")
    return t.astype(np.int64)


def check_tokens(tokens, previous: int | None = None, offset: int = 0) -> np.ndarray:
    """Any integer sequence -> int64 [N], refusing anything that is not a well-formed token stream: codes outside
    [0, VOCAB_SIZE), a first token that continues a unit, a token that continues another unit than the one being
    spoken. `previous`: the token before these (when validating a stream piece by piece), `offset`: its position."""
    t = _as_ints(tokens)
    bad = np.flatnonzero((t < 0) | (t >= VOCAB_SIZE))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"speech token {int(t[i])} at position {offset + i} is outside the Piper voice's "
                         f"vocabulary [0, {VOCAB_SIZE})")
    unit, cont = (t // 2) % NUM_UNITS, t % 2
    prev_unit = np.concatenate([[-1 if previous is None else (previous // 2) % NUM_UNITS], unit[:-1]])
    wrong = np.flatnonzero((cont == 1) & (unit != prev_unit))
    if wrong.size:
        i = int(wrong[0])
        spoken = "no unit (the stream starts here)" if prev_unit[i] < 0 else f"unit {UNITS[prev_unit[i]]!r}"
        raise InputError(f"speech token {int(t[i])} at position {offset + i} continues unit "
                         f"{UNITS[unit[i]]!r} but {spoken} is being spoken (a unit's first token is even)")
    return t


def repair_tokens(tokens, previous: int | None = None) -> np.ndarray:
    """Any integer sequence -> a well-formed token stream (what `check_tokens` accepts), for speech tokens from a
    model that may be sloppy: codes outside [0, VOCAB_SIZE) are dropped, and a token continuing another unit than
    the one being spoken (or continuing at the stream's start) starts its unit instead. `previous`: the (repaired)
    token before these. Well-formed tokens come back unchanged."""
    t = _as_ints(tokens)
    keep = (t >= 0) & (t < VOCAB_SIZE)
    if not keep.all():
        log.warning("dropping %d speech code(s) outside the Piper voice's vocabulary [0, %d)", int((~keep).sum()),
                    VOCAB_SIZE)
        t = t[keep]
    unit = (t // 2) % NUM_UNITS
    prev_unit = np.concatenate([[-1 if previous is None else (previous // 2) % NUM_UNITS], unit[:-1]])
    wrong = (t % 2 == 1) & (unit != prev_unit)
    return t - wrong  # the continue bit is the lowest: clearing it makes the token start its unit


def unit_spans(tokens) -> list[UnitSpan]:
    """Tokens -> the units they spell with their token spans and per-token gain levels (validated)."""
    t = check_tokens(tokens)
    starts = np.flatnonzero(t % 2 == 0).tolist() + [len(t)]
    gains = (t // 2) // NUM_UNITS
    return [UnitSpan(int((t[a] // 2) % NUM_UNITS), a, b, tuple(int(g) for g in gains[a:b]))
            for a, b in zip(starts[:-1], starts[1:])]


def sounds(symbols) -> str:
    """Phoneme symbols (or a string of them) -> what is said: without stress marks, word spaces, punctuation and
    sentence marks, so a word phonemized alone compares with the same word inside its sentence."""
    return "".join(ch for ch in "".join(symbols) if ch not in _UNSAID)


def sound_starts(tokens) -> tuple[str, list[int]]:
    """Tokens -> what they say (`sounds`) and, for each of its characters, the token where its unit begins."""
    said, starts = [], []
    for span in unit_spans(tokens):
        chars = sounds(UNITS[span.unit])
        said.append(chars)
        starts += [span.start] * len(chars)
    return "".join(said), starts


def token_ends_of(unit_frames: list[int]) -> list[int]:
    """Each unit's voice frames -> its token end boundary: the nearest boundary to its cumulative frame end, and
    at least one token after the previous unit's end."""
    ends, last = [], 0
    for end_frame in np.cumsum(unit_frames):
        last = max(last + 1, int(token_of_frame(end_frame)))
        ends.append(last)
    return ends


def factorized_embeddings(dim: int, std: float = 0.02, seed: int = 0) -> torch.Tensor:
    """Embeddings [VOCAB_SIZE, dim] for the codes of this vocabulary, each the sum of its unit's, its start /
    continue mark's and its gain level's random vectors (normal, `std`). A speech head that starts from them sees
    the token's parts: a "continue" token is its unit's "start" token plus one shared vector, so saying the same
    unit on is one direction to learn rather than 2,376 separate pairs. (With independent random rows the mini's
    SRH had not learned continuations after 160 steps; this start alone did not change that in 40: docs/mini.md,
    "Speaking".)"""
    g = torch.Generator().manual_seed(seed)
    unit, mark, gain = (torch.randn(n, dim, generator=g) * std for n in (NUM_UNITS, 2, len(GAINS)))
    codes = torch.arange(VOCAB_SIZE)
    return unit[(codes // 2) % NUM_UNITS] + mark[codes % 2] + gain[(codes // 2) // NUM_UNITS]


# ------------------------------------------------------------------ tokenizer


class PiperTokenizer:
    """Assistant text -> 25 Hz tokens, from the voice's own phonemes and duration predictor. Deterministic: the
    predictor's noise comes from `seed` and the sentence's phonemes."""

    def __init__(self, parts=None, seed: int = 0):
        if parts is None:
            from funaudiochat.speech.piper_voice import PiperVoiceParts

            parts = PiperVoiceParts()
        self.parts, self.seed = parts, seed

    def units(self, text: str) -> list[list[int]]:
        """Text -> units per sentence, each with "^" ... "$"."""
        if not isinstance(text, str):
            raise InputError(f"text to tokenize must be a string, got {type(text).__name__}")
        sentences = [sentence_units(s) for s in self.parts.phonemize(text)]
        if not sentences:
            raise InputError(f"nothing to say in {text[:60]!r}: it has no speakable words")
        return sentences

    def alignment(self, text: str, speed: float = 1.0) -> tuple[list[int], list[int]]:
        """(units, voice frames of each unit) as the voice would speak `text` at `speed` (1 = its own rate)."""
        if not 0.25 <= speed <= 4.0:
            raise InputError(f"speed must be in [0.25, 4], got {speed}")
        units, frames = [], []
        for sentence in self.units(text):
            units += sentence
            frames += self.sentence_frames(sentence, speed)
        return units, frames

    def sentence_frames(self, sentence: list[int], speed: float = 1.0) -> list[int]:
        """One sentence's units ("^" ... "$", or a beginning of them) -> the voice frames of each."""
        ids, owner = [], []
        for i, unit in enumerate(sentence):
            unit_id_list = unit_ids(unit, self.parts.symbol_ids)
            ids += unit_id_list
            owner += [i] * len(unit_id_list)
        key = zlib.crc32("".join(UNITS[u] for u in sentence).encode())
        noise = np.random.default_rng([self.seed, key]).standard_normal((2, len(ids)))
        w = self.parts.durations(ids, self.parts.length_scale / speed, self.parts.noise_w, noise)
        per_unit = np.bincount(owner, weights=np.ceil(w), minlength=len(sentence))  # the voice ceils too
        return per_unit.astype(np.int64).tolist()

    def word_sounds(self, words: list[str]) -> list[str]:
        """What the voice says (`sounds`) for each written word alone: "1945" -> nineteen forty-five's phonemes, a
        lone dash -> "". Inside a sentence espeak-ng may join words ("there are" -> one word) or reduce them."""
        return ["".join(sounds(s) for s in self.parts.phonemize(w)) for w in words]

    def tokenize(self, text: str, speed: float = 1.0, gain: str = "normal") -> list[int]:
        """Text -> tokens (25 Hz) spoken at `speed` with loudness `gain` (one of GAINS)."""
        if gain not in GAINS:
            raise InputError(f"gain must be one of {', '.join(GAINS)}, got {gain!r}")
        units, frames = self.alignment(text, speed)
        return encode(units, token_ends_of(frames), GAINS.index(gain))

"""The pending-units view for fun-audio-chat-mini's Speech Refined Head (work in progress, docs/mini.md "Where the
text rides"): for each speech token to predict, the next WIDTH phonetic units of the answer that have not been
started yet. The head then picks the unit to start among given ones instead of learning every word's pronunciation.

Training (`pending_from_labels`) reads them off the target codes; generation (`PendingUnits`) phonemizes the text
generated so far and counts the units already started. Both give the same units for the same answer (tests).

    PAD = NUM_UNITS: no unit known (past the answer's end, or the text not far enough ahead yet)
"""
from __future__ import annotations

import torch

from funaudiochat.errors import InputError
from funaudiochat.speech.piper_tokens import EOS, NUM_UNITS, UNITS, VOCAB_SIZE

PAD = NUM_UNITS
SENTENCE_ENDS = (".", "!", "?")


def pending_from_labels(labels: torch.Tensor, width: int, bos: int) -> torch.Tensor:
    """Speech labels [B, N] (flat 25 Hz stream: -100 outside assistant speech, `bos` delay tokens opening each
    answer, codes < VOCAB_SIZE, specials above) -> [B, N, width] unit ids: for the token at j, the first `width`
    units started after j - 1 within the same answer, PAD where none."""
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
    return torch.where(same, units, PAD)


class PendingUnits:
    """Generation side: the text of the answer so far and the codes said so far -> the next `width` units not yet
    started. Only complete words are phonemized until the text is finished (espeak's units for a word-boundary
    prefix equal the whole text's except the last 1-2 units in 97.5 % of the mini's dev answers), and an unfinished
    sentence gets no closing "$" yet."""

    def __init__(self, piper, width: int):
        if width < 1:
            raise InputError(f"the pending-units width must be at least 1, got {width}")
        self.piper, self.width = piper, width
        self._cache: tuple[str, list[int]] = ("", [])

    def units_of(self, text: str, finished: bool) -> list[int]:
        if not finished:
            cut = max(text.rfind(" "), text.rfind("\n"))
            text = text[:cut] if cut > 0 else ""
        key = f"{finished}|{text}"
        if self._cache[0] != key:
            try:
                units = [u for sentence in self.piper.units(text) for u in sentence] if text.strip() else []
            except InputError:  # nothing speakable yet
                units = []
            if units and not finished and not text.rstrip().endswith(SENTENCE_ENDS) and UNITS[units[-1]] == EOS:
                units = units[:-1]
            self._cache = (key, units)
        return self._cache[1]

    def pending(self, text: str, finished: bool, codes) -> list[int]:
        units = self.units_of(text, finished)
        started = sum(1 for c in codes if 0 <= c < VOCAB_SIZE and c % 2 == 0)
        return (units[started:started + self.width] + [PAD] * self.width)[:self.width]

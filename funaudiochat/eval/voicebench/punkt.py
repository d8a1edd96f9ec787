"""Sentences and words for IFEval's `number_sentences` and `capital_word_frequency`, after NLTK's Punkt (english)
and Treebank tokenizers, which the reference uses but whose trained model cannot be fetched here.

Sentences follow Punkt's decisions at each ". ! ?" run before whitespace (or the end), with the english model's
abbreviation, sentence-starter and collocation tables (nltk_data `tokenizers/punkt_tab/english`: abbrev_types.txt,
sent_starters.txt, collocations.tab; NLTK, Apache-2.0):
- "?" and "!" end a sentence;
- a word + "." ends one unless the word is in the abbreviation table (also the part after a last "-"); an
  abbreviation or "..." does end one when the next word is capitalised and is a sentence starter ("the", "this",
  "they", ...);
- an initial ("J.") does not end one; a number + "." does not before a lower-case word;
- a (word, next word) pair in the collocation table does not (numbers as "##number##").
Punkt also weighs how the next word was capitalised in its training text (its `ortho_context`, 27,000 words, not
available here): that can end a sentence after an abbreviation before a capitalised common word, or after an
initial, where these rules do not. docs/eval.md lists hand-made cases run through NLTK with the tables above.

Words follow the Treebank tokenizer closely enough for counting capitalised words: contractions split off
("DON'T" -> "DO", "N'T"; "GONNA" -> "GON", "NA"), hyphenated and dotted words ("U.S.A.") kept whole.
"""
from __future__ import annotations

import re

ABBREVIATIONS = frozenset("""
ct m.j t a.c n.h ms p.a.m dr pa p.m u.k st dec u.s.a lt g.k adm p h.m ga tenn yr sen n.c j.j d.h s.g inc vs s.p.a a.t
n feb sr jan s.a.y n.y col g.f c.o.m.b d ft va r.k e.f chg r.i a.g minn a.h k n.j m l.f f.j gen i.m.s s.a aug j.p
okla m.d.c ltd oct s vt r.a j.c ariz w.w b.v ore h w.r e.h mrs cie corp w n.v a.d r.j ok e.m w.c ill nov u.s prof
conn u.s.s.r mg f.g ph.d g calif messrs h.f wash tues sw bros u.n l wis mr sep d.c ave e.l co s.s reps c r.t h.c r
wed a.s v fla jr r.h c.v m.b.a rep a.a e c.i.t l.a b.f j.b d.w j.k ala f w.va sept mich n.m j.r l.p s.c colo fri
a.m g.d kan maj ky a.m.e n.d t.j cos nev""".split())
SENTENCE_STARTERS = frozenset("""
most he since so both these it nevertheless this indeed however instead under similarly some though while when in
despite although nonetheless thus there if the nor separately moreover but they yet many according sales among
meanwhile even i""".split())
COLLOCATIONS = frozenset(tuple(pair.split("/")) for pair in """
##number##/international ##number##/rj ##number##/commodities ##number##/cooper b/stewart ##number##/genentech
##number##/wedgestone i/toussie ##number##/pepper j/fialka o/ludcke ##number##/insider ##number##/aes i/magnin
##number##/credit ##number##/corrections ##number##/financing ##number##/henley ##number##/business
##number##/pay-fone b/wigton b/edelman b/levine ##number##/leisure b/smith j/walter ##number##/pegasus
##number##/dividend j/aron ##number##/review ##number##/abreast ##number##/who ##number##/letters ##number##/colgate
##number##/cbot ##number##/notable ##number##/zimmer""".split())

_BOUNDARY = re.compile(r"[.!?]+['\")\]]*(?=\s|$)")
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL = re.compile(r"^[^\W\d]$")


def _token_type(word: str) -> str:
    """Punkt's type of a word: lower case, numbers as ##number##."""
    return "##number##" if _NUMBER.match(word) else word.lower()


def _ends_sentence(before: str, mark: str, after: str) -> bool:
    """Does the mark ending `before` (its last whitespace-separated word, mark excluded) end a sentence, given the
    next word `after` ("" at the end of the text)?"""
    if "?" in mark or "!" in mark:
        return True
    word = re.sub(r"^[\"'(\[{]+", "", before.split()[-1]) if before.split() else ""
    next_word = re.sub(r"^[\"'(\[{]+", "", after)
    next_type = _token_type(next_word.rstrip(".")) if next_word else ""
    if not next_word:
        return True
    ellipsis = mark.startswith("..")
    typ = _token_type(word)
    if (typ, next_type) in COLLOCATIONS:
        return False
    if mark == "." and _INITIAL.match(word):  # before the abbreviation rule: single letters are in that table too
        return False
    if ellipsis or (mark == "." and (typ in ABBREVIATIONS or typ.split("-")[-1] in ABBREVIATIONS)):
        return next_word[:1].isupper() and next_type in SENTENCE_STARTERS
    if mark == "." and typ == "##number##" and next_word[:1].islower():
        return False
    return True


def count_sentences(text: str) -> int:
    """The number of sentences Punkt would find (see the module docstring)."""
    count, last = 0, 0
    for match in _BOUNDARY.finditer(text):
        following = text[match.end():].split(maxsplit=1)
        mark = match.group().rstrip("'\")]")
        if not _ends_sentence(text[last:match.start()], mark, following[0] if following else ""):
            continue
        if text[last:match.end()].strip(" \n\t.!?'\")]"):
            count += 1
        last = match.end()
    if text[last:].strip():
        count += 1
    return count


_SPLIT_WORDS = [(re.compile(p, re.IGNORECASE), r"\1 \2") for p in (
    r"\b(can)(not)\b", r"\b(d)('ye)\b", r"\b(gim)(me)\b", r"\b(gon)(na)\b", r"\b(got)(ta)\b", r"\b(lem)(me)\b",
    r"\b(more)('n)\b", r"\b(wan)(na)(?=\s)")]


def word_tokens(text: str) -> list[str]:
    """Treebank-like words: contractions split off ("DON'T" -> "DO", "N'T"), hyphenated and dotted words whole."""
    text = re.sub(r"(?i)(\w)(n't)\b", r"\1 \2", text)
    text = re.sub(r"(?i)(\w)('(?:s|m|d|ll|re|ve))\b", r"\1 \2", text)
    for pattern, repl in _SPLIT_WORDS:
        text = pattern.sub(repl, text)
    return re.findall(r"(?i)n't|'\w+|\w+(?:\.\w+)+\.?|\w+(?:-\w+)*|[^\w\s]", text)

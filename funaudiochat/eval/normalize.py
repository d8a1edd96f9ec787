"""English text normalisation for WER, following openai-whisper's `EnglishTextNormalizer`.

`normalize_english` gives the same output as Whisper's normaliser (with our spelling table) on ordinary sentences:
- lower case; words in [brackets], <angle brackets> and (parentheses) removed; fillers (hmm, mm, mhm, uh, um) removed;
- contractions expanded (won't -> will not, it's -> it is, ...) and titles spelled out (dr -> doctor, ...);
- accents dropped (café -> cafe, œ -> oe), symbols and punctuation become spaces;
- spelled-out numbers become digits: "twenty one" -> 21, "two hundred and five" -> 205, "three point five" -> 3.5,
  "twenty first" -> 21st, "nineteen nineties" -> 1990s, "one oh one" -> 101, "five dollars" -> $5,
  "ten percent" -> 10%, "two dollars and seven cents" -> $2.07; a lone 1 is written "one";
- about 140 common British spellings become American (colour -> color, organised -> organized, centre -> center).
Not covered (Whisper does these): "and a half", "double"/"triple" digits, "minus"/"plus" signs, "per cent",
and the rest of Whisper's ~1,700-entry British spelling list.
"""
from __future__ import annotations

import re
import unicodedata
from fractions import Fraction

_ONES = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
ONES = {w: i for i, w in enumerate(_ONES, start=1)}
ONES_SUFFIXED = {  # plurals and ordinals; like Whisper, "ninth" is missed ("nineth" is what it matches)
    **{("sixes" if w == "six" else w + "s"): (n, "s") for w, n in ONES.items()},
    **{w + ("h" if w.endswith("t") else "th"): (n, "th") for w, n in ONES.items() if n > 3 and n not in (5, 12)},
    "zeroth": (0, "th"), "first": (1, "st"), "second": (2, "nd"), "third": (3, "rd"), "fifth": (5, "th"),
    "twelfth": (12, "th"),
}
TENS = {w: 10 * i for i, w in enumerate(["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
                                         "ninety"], start=2)}
TENS_SUFFIXED = {**{w[:-1] + "ies": (n, "s") for w, n in TENS.items()},
                 **{w[:-1] + "ieth": (n, "th") for w, n in TENS.items()}}
MULTIPLIERS = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
MULTIPLIERS_SUFFIXED = {**{w + "s": (n, "s") for w, n in MULTIPLIERS.items()},
                        **{w + "th": (n, "th") for w, n in MULTIPLIERS.items()}}
ZEROS = {"o", "oh", "zero"}
CURRENCY_AFTER = {"dollar": "$", "dollars": "$", "pound": "£", "pounds": "£", "euro": "€", "euros": "€",
                  "cent": "¢", "cents": "¢"}
NUMBER_WORDS = {*ONES, *ONES_SUFFIXED, *TENS, *TENS_SUFFIXED, *MULTIPLIERS, *MULTIPLIERS_SUFFIXED, *ZEROS,
                *CURRENCY_AFTER, "percent", "and", "point"}
_NUMERIC = re.compile(r"^([$£€¢]?)(\d+(?:\.\d+)?)$")

REPLACEMENTS = [  # applied in order, after lower-casing
    (r"\bwon't\b", "will not"), (r"\bcan't\b", "can not"), (r"\blet's\b", "let us"), (r"\bain't\b", "aint"),
    (r"\by'all\b", "you all"), (r"\bwanna\b", "want to"), (r"\bgotta\b", "got to"), (r"\bgonna\b", "going to"),
    (r"\bi'ma\b", "i am going to"), (r"\bimma\b", "i am going to"), (r"\bwoulda\b", "would have"),
    (r"\bcoulda\b", "could have"), (r"\bshoulda\b", "should have"), (r"\bma'am\b", "madam"),
    (r"\bmr\b", "mister "), (r"\bmrs\b", "missus "), (r"\bst\b", "saint "), (r"\bdr\b", "doctor "),
    (r"\bprof\b", "professor "), (r"\bcapt\b", "captain "), (r"\bgov\b", "governor "), (r"\bald\b", "alderman "),
    (r"\bgen\b", "general "), (r"\bsen\b", "senator "), (r"\brep\b", "representative "),
    (r"\bpres\b", "president "), (r"\brev\b", "reverend "), (r"\bhon\b", "honorable "),
    (r"\basst\b", "assistant "), (r"\bassoc\b", "associate "), (r"\blt\b", "lieutenant "),
    (r"\bcol\b", "colonel "), (r"\bjr\b", "junior "), (r"\bsr\b", "senior "), (r"\besq\b", "esquire "),
    (r"'d been\b", " had been"), (r"'s been\b", " has been"), (r"'d gone\b", " had gone"),
    (r"'s gone\b", " has gone"), (r"'d done\b", " had done"), (r"'s got\b", " has got"),
    (r"n't\b", " not"), (r"'re\b", " are"), (r"'s\b", " is"), (r"'d\b", " would"), (r"'ll\b", " will"),
    (r"'t\b", " not"), (r"'ve\b", " have"), (r"'m\b", " am"),
]
_REPLACEMENTS = [(re.compile(p), r) for p, r in REPLACEMENTS]

# letters that NFKD does not split into base + accent
LETTER_FOLDS = {"œ": "oe", "Œ": "OE", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "ß": "ss", "ẞ": "SS", "ð": "d",
                "Ð": "D", "þ": "th", "Þ": "th", "ł": "l", "Ł": "L", "đ": "d", "Đ": "D"}

_BRITISH = ("colour favour flavour honour humour labour neighbour behaviour harbour rumour vapour odour armour "
            "endeavour").split()
SPELLINGS = {
    **{w: w.replace("our", "or") for w in _BRITISH},
    **{w + "s": w.replace("our", "or") + "s" for w in _BRITISH},
    **{w[:-2] + suffix: w[:-2] + suffix.replace("s", "z") for w in
       ("organise", "realise", "recognise", "apologise", "criticise", "emphasise", "memorise", "summarise",
        "prioritise", "minimise", "maximise", "specialise", "categorise", "standardise", "normalise")
       for suffix in ("se", "sed", "ses", "sing", "sation")},
    "favourite": "favorite", "favourites": "favorites", "colourful": "colorful", "neighbourhood": "neighborhood",
    "centre": "center", "centres": "centers", "theatre": "theater", "metre": "meter", "metres": "meters",
    "litre": "liter", "litres": "liters", "fibre": "fiber", "analyse": "analyze", "analysed": "analyzed",
    "travelling": "traveling", "travelled": "traveled", "traveller": "traveler", "cancelled": "canceled",
    "labelled": "labeled", "modelling": "modeling", "grey": "gray", "programme": "program",
    "programmes": "programs", "defence": "defense", "licence": "license", "offence": "offense",
    "catalogue": "catalog", "dialogue": "dialog", "jewellery": "jewelry", "cheque": "check", "tyre": "tire",
    "tyres": "tires", "aluminium": "aluminum", "mould": "mold", "plough": "plow", "pyjamas": "pajamas",
}
SPELLINGS = {k: v for k, v in SPELLINGS.items() if k != v}


def _fold_symbols(s: str, keep: str) -> str:
    """NFKD; drop combining accents; fold œ/ß/...; every other mark, symbol or punctuation becomes a space."""
    out = []
    for ch in unicodedata.normalize("NFKD", s):
        category = unicodedata.category(ch)
        if ch in keep:
            out.append(ch)
        elif ch in LETTER_FOLDS:
            out.append(LETTER_FOLDS[ch])
        elif category == "Mn":
            continue
        elif category[0] in "MSP":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def _add_small(value, n: int, prev: str | None):
    """Append a number below 20 to a running value: 20 + 3 = 23, but 23 then 4 reads as the digits "234"."""
    if value is None:
        return n
    if isinstance(value, str) or prev in ONES:
        return value[:-1] + str(n) if prev in TENS and n < 10 else f"{value}{n}"
    limit = 10 if n < 10 else 100
    return value + n if value % limit == 0 else f"{value}{n}"


def _add_tens(value, n: int):
    if value is None:
        return n
    return value + n if isinstance(value, int) and value % 100 == 0 else f"{value}{n}"


def _multiply(value, m: int):
    """Returns (new value, finished value to emit or None)."""
    if value is None:
        return m, None
    if isinstance(value, str) or value == 0:
        try:
            product = Fraction(value) * m
        except ValueError:
            return m, value
        return (product.numerator, None) if product.denominator == 1 else (m, value)
    return value // 1000 * 1000 + value % 1000 * m, None


def _numbers(words: list[str]) -> list[str]:
    """Spelled-out numbers -> digits, one pass over the words with a running value."""
    out: list[str] = []
    value, prefix = None, ""

    def emit(v, suffix: str = "") -> None:
        nonlocal value, prefix
        out.append(f"{prefix}{v}{suffix}")
        value, prefix = None, ""

    for i, word in enumerate(words):
        prev = words[i - 1] if i else None
        nxt = words[i + 1] if i + 1 < len(words) else None
        next_is_number = nxt is not None and (nxt in NUMBER_WORDS or _NUMERIC.match(nxt) is not None)
        numeric = _NUMERIC.match(word)
        if numeric:
            if isinstance(value, str) and value.endswith("."):
                value += word  # the digits after "point"
                continue
            if value is not None:
                emit(value)
            f = Fraction(numeric[2])
            value, prefix = (f.numerator if f.denominator == 1 else numeric[2]), numeric[1] or prefix
        elif word not in NUMBER_WORDS:
            if value is not None:
                emit(value)
            out.append(word)
        elif word in ZEROS:
            value = f"{value or ''}0"
        elif word in ONES:
            value = _add_small(value, ONES[word], prev)
        elif word in ONES_SUFFIXED:
            n, suffix = ONES_SUFFIXED[word]
            emit(_add_small(value, n, prev), suffix)
        elif word in TENS:
            value = _add_tens(value, TENS[word])
        elif word in TENS_SUFFIXED:
            n, suffix = TENS_SUFFIXED[word]
            emit(_add_tens(value, n), suffix)
        elif word in MULTIPLIERS or word in MULTIPLIERS_SUFFIXED:
            m, suffix = (MULTIPLIERS[word], None) if word in MULTIPLIERS else MULTIPLIERS_SUFFIXED[word]
            value, finished = _multiply(value, m)
            if finished is not None:
                emit(finished)
                value = m
            if suffix is not None:
                emit(value, suffix)
        elif word in CURRENCY_AFTER or word == "percent":
            if value is None:
                out.append(word)
            elif word == "percent":
                emit(value, "%")
            else:
                prefix = CURRENCY_AFTER[word]
                emit(value)
        elif word == "and" and next_is_number and prev in MULTIPLIERS:
            continue  # "two hundred and five"
        elif word == "point" and (nxt in ONES or nxt in TENS or nxt in ZEROS or (nxt and _NUMERIC.match(nxt))):
            value = f"{value or ''}."
        else:  # "and" / "point" that do not continue a number
            if value is not None:
                emit(value)
            out.append(word)
    if value is not None:
        emit(value)
    return out


def normalize_numbers(s: str) -> str:
    s = re.sub(r"([a-z])([0-9])", r"\1 \2", s)
    s = re.sub(r"([0-9])([a-z])", r"\1 \2", s)
    s = re.sub(r"([0-9])\s+(st|nd|rd|th|s)\b", r"\1\2", s)  # 21 st -> 21st, 1990 s -> 1990s
    s = " ".join(_numbers(s.split()))
    s = re.sub(r"([€£$])([0-9]+) (?:and )?¢([0-9]{1,2})\b", lambda m: f"{m[1]}{m[2]}.{int(m[3]):02d}", s)
    s = re.sub(r"[€£$]0\.([0-9]{1,2})\b", lambda m: f"¢{int(m[1])}", s)  # $0.07 -> ¢7
    return re.sub(r"\b1(s?)\b", r"one\1", s)


def normalize_english(text: str) -> str:
    """Normalise English text for WER the way Whisper's English normaliser does (see the module docstring)."""
    s = text.lower()
    s = re.sub(r"[<\[][^>\]]*[>\]]", "", s)
    s = re.sub(r"\(([^)]+?)\)", "", s)
    s = re.sub(r"\b(hmm|mm|mhm|mmm|uh|um)\b", "", s)
    s = re.sub(r"\s+'", "'", s)
    for pattern, replacement in _REPLACEMENTS:
        s = pattern.sub(replacement, s)
    s = re.sub(r"(\d),(\d)", r"\1\2", s)  # 1,000 -> 1000
    s = re.sub(r"\.([^0-9]|$)", r" \1", s)  # periods that are not decimal points
    s = _fold_symbols(s, keep=".%$¢€£")
    s = normalize_numbers(s)
    s = " ".join(SPELLINGS.get(w, w) for w in s.split())
    s = re.sub(r"[.$¢€£]([^0-9])", r" \1", s)  # symbols left without a number
    s = re.sub(r"([^0-9])%", r"\1 ", s)
    return re.sub(r"\s+", " ", s).strip()

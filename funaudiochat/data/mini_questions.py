"""The question set of fun-audio-chat-mini's data (`funaudiochat data build-mini`): templates x curated slot lists
(`prompts/mini/*.txt`), deterministic from a seed, split into train / dev / test with no question text shared.

Families (MINI.md, issue 12): facts (gold answers for containment scoring: capitals, chemical symbols, languages,
continents, units, animals, colours, opposites, dates, trivia), arithmetic (gold), definitions, how-to,
comparisons, chit-chat, advice, emotional statements, instructions ("say it in one sentence") and follow-ups (two
user turns, the first one a question of another family, some with gold answers: "And what about Spain?").

Every candidate text is unique across the whole pool before splitting, and a follow-up's first turn is taken out
of the pool it came from, so a split never shares a question (or a follow-up's first turn) with another.
"""
from __future__ import annotations

import calendar
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

LISTS = Path(__file__).with_name("prompts") / "mini"
SPLITS = ("train", "dev", "test")
GOLD_FAMILIES = ("facts", "arithmetic")
# items per split and family before the answer filters (train and dev lose a few; test keeps every item)
QUOTAS = {
    "facts":        {"train": 680, "dev": 60, "test": 110},
    "arithmetic":   {"train": 2000, "dev": 90, "test": 75},
    "definitions":  {"train": 500, "dev": 25, "test": 20},
    "howto":        {"train": 240, "dev": 20, "test": 14},
    "comparisons":  {"train": 400, "dev": 25, "test": 20},
    "chitchat":     {"train": 170, "dev": 14, "test": 14},
    "advice":       {"train": 205, "dev": 20, "test": 14},
    "emotional":    {"train": 700, "dev": 35, "test": 20},
    "instructions": {"train": 1900, "dev": 60, "test": 20},
    "followup":     {"train": 550, "dev": 30, "test": 20},
}


@dataclass(frozen=True)
class Question:
    id: str
    split: str
    family: str
    turns: tuple[str, ...]          # one or two user turns
    expected: tuple[str, ...] = ()  # gold answers (any one, as whole words or the last number) for the last turn

    @property
    def gold(self) -> bool:
        return bool(self.expected)


def read_list(name: str) -> list[list[str]]:
    """Rows of `prompts/mini/NAME.txt`: '|'-separated fields; blank lines and '#' comments skipped."""
    rows = []
    for line in (LISTS / f"{name}.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append([field.strip() for field in line.split("|")])
    return rows


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _alts(field: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in field.split(",") if a.strip())


# ---------------------------------------------------------------------------------------------------- gold facts
def fact_candidates() -> list[tuple[str, tuple[str, ...]]]:
    """(question, gold answers) for the facts family."""
    out = []
    for country, capital in read_list("capitals"):
        for t in ("What is the capital of {c}?", "Which city is the capital of {c}?", "Tell me the capital of {c}.",
                  "What's the capital city of {c}?", "Do you know the capital of {c}?"):
            out.append((t.format(c=country), (capital,)))
    for element, symbol in read_list("elements"):
        for t in ("What is the chemical symbol for {e}?", "Which element has the symbol {s}?",
                  "What's the symbol of {e} on the periodic table?", "Tell me which element is written {s}."):
            gold = (element,) if "{s}" in t else (symbol,)
            out.append((t.format(e=element, s=symbol), gold))
    for country, language in read_list("languages"):
        for t in ("What language do people speak in {c}?", "What is the main language of {c}?",
                  "Which language is spoken in {c}?"):
            out.append((t.format(c=country), (language,)))
    for country, continent in read_list("continents"):
        for t in ("On which continent is {c}?", "Which continent is {c} in?", "Is {c} in Europe, Asia, Africa, "
                  "or the Americas? Tell me the continent."):
            if continent == "Oceania" and "Americas" in t:
                continue
            gold = (continent, "America") if continent.endswith("America") and "Americas" in t else (continent,)
            out.append((t.format(c=country), gold))
    for small, big, number, word in read_list("units"):
        a = "an" if big[0] in "aeiou" else "a"
        for t in ("How many {s} are in {a} {b}?", "How many {s} does {a} {b} have?",
                  "Tell me how many {s} make {a} {b}."):
            out.append((t.format(s=small, a=a, b=big), (number, word)))
    for animal, number, word in read_list("legs"):
        a = "an" if animal[0] in "aeiou" else "a"
        for t in ("How many legs does {a} {x} have?", "How many legs has {a} {x} got?", "Count the legs of {a} {x}."):
            out.append((t.format(a=a, x=animal), (number, word)))
    for animal, baby in read_list("young"):
        for t in ("What is a baby {x} called?", "What do you call a young {x}?", "What's the name for a baby {x}?"):
            out.append((t.format(x=animal), (baby, baby + "s")))
    for word, opposites in read_list("opposites"):
        for t in ("What is the opposite of {w}?", "What's the opposite of the word {w}?", "Give me the opposite of "
                  "{w}."):
            out.append((t.format(w=word), _alts(opposites)))
    for a, b, mix in read_list("colors"):
        for x, y in ((a, b), (b, a)):
            for t in ("What color do you get when you mix {x} and {y}?", "If I mix {x} paint with {y} paint, what "
                      "color do I get?"):
                out.append((t.format(x=x, y=y), _alts(mix)))
    months, days = list(calendar.month_name)[1:], list(calendar.day_name)
    for names in (months, days):
        for i, name in enumerate(names):
            after, before = names[(i + 1) % len(names)], names[i - 1]
            kind = "month" if names is months else "day"
            out += [(f"What {kind} comes after {name}?", (after,)), (f"Which {kind} comes before {name}?", (before,)),
                    (f"What is the {kind} after {name}?", (after,))]
    ordinals = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
                "eleventh", "twelfth")
    for i, month in enumerate(months):
        out.append((f"What number month of the year is {month}?", (str(i + 1), ordinals[i])))
    for question, answers in read_list("trivia"):
        out.append((question, _alts(answers)))
    return out


# ---------------------------------------------------------------------------------------------------- arithmetic
_ARITH = {
    "+": ("What is {a} plus {b}?", "What's {a} plus {b}?", "Can you add {a} and {b}?", "How much is {a} plus {b}?",
          "What do you get when you add {a} and {b}?",
          "If I have {a} apples and buy {b} more, how many apples do I have?"),
    "-": ("What is {a} minus {b}?", "What's {a} take away {b}?", "How much is {a} minus {b}?",
          "What do you get if you subtract {b} from {a}?",
          "I had {a} dollars and spent {b}. How many dollars are left?"),
    "*": ("What is {a} times {b}?", "What's {a} multiplied by {b}?", "How much is {a} times {b}?",
          "What do you get when you multiply {a} by {b}?",
          "There are {a} boxes with {b} pencils each. How many pencils are there?"),
    "/": ("What is {a} divided by {b}?", "What's {a} divided by {b}?", "How much is {a} divided by {b}?",
          "If {a} cookies are shared equally among {b} kids, how many does each kid get?"),
}


def arithmetic_question(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        result = a + b
    elif op == "-":
        a = rng.randint(2, 120)
        b = rng.randint(1, a - 1)
        result = a - b
    elif op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        result = a * b
    else:
        b, result = rng.randint(2, 12), rng.randint(2, 12)
        a = b * result
    return rng.choice(_ARITH[op]).format(a=a, b=b), (str(result),)


# ---------------------------------------------------------------------------------------------------- open families
def _bare(noun: str) -> str:
    """'a volcano' -> 'volcano' (nouns.txt spells each noun with its article, if it takes one)."""
    for article in ("a ", "an ", "the "):
        if noun.startswith(article):
            return noun[len(article):]
    return noun


def definition_candidates() -> list[str]:
    out = []
    for (noun,) in read_list("nouns"):
        out += [f"What is {noun}?", f"What does the word {_bare(noun)} mean?", f"Can you explain what {noun} is?",
                f"Define {_bare(noun)} for me."]
    return out


def howto_candidates() -> list[str]:
    out = []
    for (task,) in read_list("tasks"):
        out += [f"How do I {task}?", f"What's the best way to {task}?", f"Can you tell me how to {task}?",
                f"What is the easiest way to {task}?"]
    return out


def comparison_candidates() -> list[str]:
    out = []
    for a, b in read_list("pairs"):
        out += [f"What is the difference between {a} and {b}?", f"How is {a} different from {b}?",
                f"Which do you like better, {a} or {b}?", f"Compare {a} and {b} for me."]
    things = {row[0]: _alts(row[1]) for row in read_list("things")}
    for kind in ("food", "drink", "activity", "place", "season"):
        values = things[kind]
        for i, x in enumerate(values):
            for y in values[i + 1:]:
                out += [f"Which is better, {x} or {y}?", f"Do you prefer {x} or {y}?"]
    return out


def chitchat_candidates() -> list[str]:
    things = {row[0]: _alts(row[1]) for row in read_list("things")}
    out = ["Hi! How are you today?", "Good morning! How did you sleep?", "Hello there, what's up?",
           "Hey, how is your day going?", "Good evening! What have you been up to?", "Nice to meet you!",
           "Can you tell me a joke?", "Tell me something fun.", "What do you like to talk about?",
           "Do you have a favorite color?", "Tell me a fun fact.", "What is your name?", "Are you having a good day?",
           "Thanks for your help earlier!", "What should we talk about?", "Guess what I did today!"]
    for kind in ("season", "food", "drink", "animal", "weather", "place"):
        out.append(f"What's your favorite {kind}?")
    for activity in things["activity"]:
        out += [f"Do you like {activity}?", f"I love {activity}. Do you?", f"I spent the whole day {activity}.",
                f"What do you think about {activity}?", f"Is {activity} a good hobby?"]
    for food in things["food"] + things["drink"]:
        out += [f"I just had some {food}.", f"Do you like {food}?", f"I'm thinking of having {food} tonight."]
    for animal in things["animal"]:
        out += [f"Do you like {animal}?", f"What do you think of {animal}?", f"I want to tell you about {animal}."]
    for weather in things["weather"]:
        out += [f"Do you like {weather}?", f"There is so much {weather} today.", f"How do you feel about {weather}?"]
    for place in things["place"]:
        out += [f"I'm going to {place} this weekend.", f"Do you like {place}?", f"Tell me about a day at {place}."]
    for season in things["season"]:
        out += [f"What do you like about {season}?", f"Is {season} your favorite time of year?"]
    for day in calendar.day_name:
        out += [f"Happy {day}!", f"What are you doing this {day}?", f"How do you feel about {day}s?"]
    return out


def advice_candidates() -> list[str]:
    out = []
    for (topic,) in read_list("topics"):
        out += [f"Can you give me some advice on {topic}?", f"Do you have any tips for {topic}?",
                f"What is your best advice for {topic}?", f"I need help with {topic}. Any ideas?"]
    for (situation,) in read_list("situations"):
        out += [f"What should I do if {situation}?", f"Any advice? {_cap(situation)}.",
                f"What can I do when {situation}?"]
    return out


def emotional_candidates() -> list[str]:
    """Feelings paired with reasons of the same valence ('?' goes with both): no "I lost my wallet, and I'm happy"."""
    out = []
    emotions, reasons = read_list("emotions"), read_list("reasons")
    for emotion, feel in emotions:
        out += [f"I feel so {emotion} today.", f"I'm really {emotion} right now."]
        for reason, why in reasons:
            if "?" in (feel, why) or feel == why:
                out += [f"I feel {emotion} because {reason}.", f"{_cap(reason)}, and I'm {emotion}."]
    return out


_STYLE = ("Say it in one sentence: {q}", "{q} Answer in one sentence.", "{q} Please keep it short.",
          "In a few words, {q_low}", "{q} Explain it like I'm five.", "{q} Give me just the main idea.",
          "Briefly, {q_low}", "{q} Say it simply.")


def instruction_candidates() -> list[str]:
    out = []
    seeds = [f"what is {noun}?" for (noun,) in read_list("nouns")]
    seeds += [f"how do I {t}?" for (t,) in read_list("tasks")]
    for q in seeds:
        for t in _STYLE:
            out.append(t.format(q=_cap(q), q_low=q))
    return out


_FOLLOW_UPS = ("Can you say that more simply?", "Why is that?", "Tell me more.", "Can you give me an example?",
               "Can you say that in one sentence?", "Are you sure?", "What else should I know?",
               "And why does that matter?", "Thanks! Anything else?")


# ---------------------------------------------------------------------------------------------------- the set
def question_id(family: str, turns: tuple[str, ...]) -> str:
    return f"{family}-{hashlib.sha1(' || '.join(turns).encode('utf-8')).hexdigest()[:10]}"


def generate(seed: int = 0, quotas: dict | None = None) -> list[Question]:
    """The question set: per family and split, `quotas[family][split]` items (fewer when a family runs out),
    deterministic from `seed`, no text shared between splits. Ordered by split, family, then draw."""
    quotas = quotas or QUOTAS
    rng = random.Random(seed)
    pools: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = {}
    pools["facts"] = [((q,), g) for q, g in fact_candidates()]
    need = sum(quotas.get("arithmetic", {}).values())
    arith: dict[str, tuple[str, ...]] = {}
    while len(arith) < need and len(arith) < 20000:
        q, g = arithmetic_question(rng)
        arith.setdefault(q, g)
    pools["arithmetic"] = [((q,), g) for q, g in arith.items()]
    for family, make in (("definitions", definition_candidates), ("howto", howto_candidates),
                         ("comparisons", comparison_candidates), ("chitchat", chitchat_candidates),
                         ("advice", advice_candidates), ("emotional", emotional_candidates),
                         ("instructions", instruction_candidates)):
        pools[family] = [((q,), ()) for q in make()]

    seen: set[str] = set()  # one text, one family: drop repeats across families (first family wins)
    for family, pool in pools.items():
        unique = []
        for turns, gold in pool:
            if turns[0] not in seen:
                seen.add(turns[0])
                unique.append((turns, gold))
        rng.shuffle(unique)
        pools[family] = unique

    # follow-ups: the first turn is taken out of its pool, so no split sees it as a question of its own
    n_follow = sum(quotas.get("followup", {}).values())
    capitals = dict(read_list("capitals"))
    follow = []
    sources = ("facts", "definitions", "howto", "instructions")
    for i in range(n_follow):
        source = pools[sources[i % len(sources)]]
        if not source:
            break
        (first,), gold = source.pop()
        second, second_gold = rng.choice(_FOLLOW_UPS), ()
        if first.startswith("What is the capital of ") and rng.random() < 0.7:
            country = rng.choice(sorted(set(capitals) - {first[len("What is the capital of "):-1]}))
            second, second_gold = f"And what about {country}?", (capitals[country],)
        follow.append(((first, second), second_gold))
    pools["followup"] = follow

    by_split: dict[str, list[Question]] = {}
    for split in reversed(SPLITS):  # test first: a family that runs short shortens train, not test
        by_split[split] = []
        for family, pool in pools.items():
            take = quotas.get(family, {}).get(split, 0)
            chosen, pools[family] = pool[:take], pool[take:]
            by_split[split] += [Question(question_id(family, turns), split, family, turns, gold)
                                for turns, gold in chosen]
    out = [q for split in SPLITS for q in by_split[split]]
    check_disjoint(out)
    return out


def check_disjoint(questions: list[Question]) -> None:
    """Raise if two splits share a question text (a whole conversation or a first turn) or two items an id."""
    owner: dict[str, str] = {}
    ids = set()
    for q in questions:
        if q.id in ids:
            raise ValueError(f"duplicate question id {q.id}")
        ids.add(q.id)
        for text in {q.turns[0], " || ".join(q.turns)}:
            if owner.setdefault(text, q.split) != q.split:
                raise ValueError(f"question {text!r} is in both {owner[text]} and {q.split}")

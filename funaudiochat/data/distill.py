"""Text data from the pretrained LLM: answer prompts with SmolLM2-Instruct through our engine (text mode) and keep
the question/answer pairs that pass a set of filters (the paper builds its speech data the same way: text, then TTS,
then a WER filter).

Prompts come from files (one per line, or JSONL with "prompt" and optional "family", "id", "expected") or from the
built-in families in `prompts/` (MINI.md: facts, arithmetic, definitions, how-to, chit-chat, tool calls, style
requests, emotional turns). `expected` lists strings one of which the answer must contain (facts, arithmetic).
The tool-call family is answered under a tools system prompt (`prompts/tools.json`) and must produce valid
`<tool_call>` blocks naming those tools.

Outputs, next to each other: OUT (kept pairs, JSONL), OUT with suffix .rejected.jsonl (with the reason), and
.report.json (counts of this run). Both JSONL files are appended answer by answer, and prompts already in either are
skipped, so an interrupted run resumes where it stopped. Greedy answers are made with continuous batching, each row
exactly as alone, so they do not depend on the batch size or on interruptions. Sampling runs in fixed batches seeded
per batch: the same prompt set and batch size give the same answers; a resumed run samples the remaining prompts
afresh.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from funaudiochat import fileio
from funaudiochat.engine.generate import Engine, GenerationConfig
from funaudiochat.engine.prompt import Prompt, stack_prompts
from funaudiochat.errors import InputError
from funaudiochat.text.chat import DEFAULT_SYSTEM, render_chatml
from funaudiochat.text.tokenizer import TextTokenizer
from funaudiochat.text.tools import parse_tool_calls, tools_system_prompt

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).with_name("prompts")
TOOLS_FILE = PROMPTS_DIR / "tools.json"
TOOL_FAMILY = "tools"

# Refusals and AI disclaimers (case-insensitive). Kept specific: "I can't imagine how hard..." is a fine answer.
REFUSALS = (
    r"\bas an ai\b", r"\bas a (large )?language model\b", r"\bi('m| am) (just )?an ai\b",
    r"\bi (cannot|can't|can not|am unable to|'m unable to|am not able to|'m not able to|won't) "
    r"(help|assist|provide|answer|do that|fulfill|comply|browse|access)",
    r"\bi('m| am) sorry,? but\b", r"\bi don't have (access to|the ability|real-time|personal)",
    r"\bi do not have (access to|the ability|real-time|personal)",
)


@dataclass(frozen=True)
class DistillPrompt:
    id: str
    prompt: str
    family: str = "custom"
    expected: tuple[str, ...] = ()


@dataclass
class Filters:
    """Why an answer is rejected, checked in this order (the first that applies is the reason)."""

    min_words: int = 2            # "too_short" below
    max_words: int = 150          # "too_long" above (spoken answers should be short)
    drop_unfinished: bool = True  # "unfinished": no end of turn within max_new_tokens
    ngram: int = 4                # "repetition": a word n-gram occurring more than max_ngram_repeats times,
    max_ngram_repeats: int = 2    # or the same sentence (>= ngram words) twice
    refusals: tuple[str, ...] = REFUSALS  # "refusal"


@dataclass
class DistillSettings:
    batch_size: int = 8
    max_new_tokens: int = 160
    greedy: bool = False
    temperature: float = 0.2      # SmolLM2-Instruct's recommended sampling
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int = 0
    system: str = DEFAULT_SYSTEM


@dataclass
class DistillReport:
    prompts: int = 0
    already_done: int = 0
    processed: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    by_family: dict = field(default_factory=dict)  # family -> {"kept": n, "rejected": n}
    new_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rejected"] = dict(self.rejected.most_common())
        out["tokens_per_second"] = round(self.new_tokens / self.seconds, 2) if self.seconds else 0.0
        return out


# ---------------------------------------------------------------------------------------------------- prompts
def prompt_id(family: str, text: str) -> str:
    return f"{family}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:10]}"


def families() -> list[str]:
    """Names of the built-in prompt families."""
    return sorted(p.stem for p in PROMPTS_DIR.iterdir() if p.suffix in (".txt", ".jsonl"))


def read_prompts(path: str | Path, family: str | None = None) -> list[DistillPrompt]:
    """A .jsonl file ({"prompt", "family"?, "id"?, "expected"?} per line) or text (one prompt per line; blank lines
    and lines starting with '#' are skipped). `family` defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such prompt file")
    family = family or path.stem
    out = []
    jsonl = path.suffix == ".jsonl"
    for n, rec in fileio.read_jsonl(path) if jsonl else fileio.read_lines(path):
        if isinstance(rec, fileio.LineProblem):
            raise InputError(f"{path}:{n}: {rec}")
        if not jsonl:
            line = rec.strip()
            if not line.startswith("#"):
                out.append(DistillPrompt(prompt_id(family, line), line, family))
            continue
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise InputError(f'{path}:{n}: expected an object with a non-empty "prompt" string')
        fam = str(rec.get("family") or family)
        expected = rec.get("expected", ())
        expected = (expected,) if isinstance(expected, str) else tuple(str(e) for e in expected)
        out.append(DistillPrompt(str(rec.get("id") or prompt_id(fam, rec["prompt"])), rec["prompt"].strip(), fam,
                                 expected))
    return out


def builtin_prompts(names: list[str] | str = "all") -> list[DistillPrompt]:
    """Prompts of the named built-in families ("all", a list, or a comma-separated string)."""
    known = families()
    if isinstance(names, str):
        names = known if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"unknown prompt families {unknown}; built-in: {', '.join(known)} (or 'all')")
    out = []
    for name in names:
        path = next(p for p in (PROMPTS_DIR / f"{name}.jsonl", PROMPTS_DIR / f"{name}.txt") if p.is_file())
        out += read_prompts(path, name)
    return out


@functools.lru_cache(maxsize=1)
def tools() -> tuple[dict, ...]:
    """The tool set of the tool-call family (OpenAI-style function definitions)."""
    return tuple(json.loads(TOOLS_FILE.read_text(encoding="utf-8")))


def system_for(p: DistillPrompt, default: str) -> str:
    return tools_system_prompt(list(tools()), base=default) if p.family == TOOL_FAMILY else default


# ---------------------------------------------------------------------------------------------------- filters
_WORD = re.compile(r"[\w']+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def repeated(answer: str, n: int, max_repeats: int) -> bool:
    words = [w.lower() for w in _WORD.findall(answer)]
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    if grams and max(grams.values()) > max_repeats:
        return True
    sentences = [s.strip().lower() for s in _SENTENCE.split(answer) if len(_WORD.findall(s)) >= n]
    return len(sentences) != len(set(sentences))


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def matches_expected(answer: str, expected: tuple[str, ...]) -> bool:
    """A numeric expectation must be the answer's last number (a worked answer ends with its result; "1,042" reads
    as 1042); a text one must occur in it as whole words (case-insensitive)."""
    text = answer.lower().replace(",", "")
    numbers = _NUMBER.findall(text)
    for e in (e.lower().replace(",", "") for e in expected):
        if _NUMBER.fullmatch(e):
            if numbers and float(numbers[-1]) == float(e):
                return True
        elif re.search(rf"\b{re.escape(e)}\b", text):
            return True
    return False


def reject_reason(p: DistillPrompt, answer: str, finished: bool, filters: Filters) -> str | None:
    """None when the answer is kept, else the reason (the report's key)."""
    if not answer.strip():
        return "empty"
    if filters.drop_unfinished and not finished:
        return "unfinished"
    if p.family == TOOL_FAMILY:
        parsed = parse_tool_calls(answer)
        names = {t["function"]["name"] for t in tools()}
        if not parsed.calls or parsed.errors or any(c.name not in names for c in parsed.calls):
            return "bad_tool_call"
        return None
    n_words = len(_WORD.findall(answer))
    if n_words < filters.min_words:
        return "too_short"
    if n_words > filters.max_words:
        return "too_long"
    lowered = answer.lower()
    if any(re.search(r, lowered) for r in filters.refusals):
        return "refusal"
    if repeated(answer, filters.ngram, filters.max_ngram_repeats):
        return "repetition"
    if p.expected and not matches_expected(answer, p.expected):
        return "wrong_answer"
    return None


# ---------------------------------------------------------------------------------------------------- run
def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """(kept JSONL, rejected JSONL, report JSON) for the output path `out`."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    return out, stem.with_name(stem.name + ".rejected.jsonl"), stem.with_name(stem.name + ".report.json")


def done_ids(*paths: Path) -> set[str]:
    ids = set()
    for path in paths:
        if path.exists():
            for n, rec in fileio.read_jsonl(path):
                if isinstance(rec, fileio.LineProblem) or not isinstance(rec.get("id"), str):
                    why = rec if isinstance(rec, fileio.LineProblem) else 'no "id" string'
                    raise InputError(f"{path}:{n}: not a distill record ({why}); remove the line or the file "
                                     f"to start over")
                ids.add(rec["id"])
    return ids


class Distiller:
    """Answers prompts in left-padded batches with an `Engine` in text mode."""

    def __init__(self, engine: Engine, tokenizer: TextTokenizer, settings: DistillSettings | None = None,
                 filters: Filters | None = None):
        self.engine, self.tok = engine, tokenizer
        self.settings, self.filters = settings or DistillSettings(), filters or Filters()
        sp = tokenizer.special
        self.eos = tuple(i for i in (sp.im_end, sp.endoftext) if i is not None)
        text_cfg = engine.cfg.text_config
        self.pad = text_cfg.pad_token_id if text_cfg.pad_token_id is not None else self.eos[0]

    def generation(self, batch_no: int) -> GenerationConfig:
        s = self.settings
        return GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=not s.greedy, temperature=s.temperature,
                                top_p=s.top_p, repetition_penalty=s.repetition_penalty, eos_token_id=self.eos,
                                pad_token_id=self.pad, disable_speech=True, seed=s.seed + batch_no)

    def messages(self, p: DistillPrompt) -> list[dict]:
        return [{"role": "system", "content": system_for(p, self.settings.system)}, {"role": "user", "content": p.prompt}]

    def encode(self, p: DistillPrompt) -> list[int]:
        return self.tok.encode(render_chatml(self.messages(p)))

    def _answer_text(self, ids: list[int]) -> tuple[str, bool, int]:
        """(answer text, finished, new tokens) of one row's new ids: the text up to the first end id."""
        end = next((j for j, t in enumerate(ids) if t in self.eos), None)
        tokens = ids if end is None else ids[:end]
        return self.tok.decode(tokens).strip(), end is not None, len(tokens)

    def answer(self, prompt_ids: list[list[int]], batch_no: int = 0) -> list[tuple[str, bool, int]]:
        """(answer text, finished, new tokens) per encoded prompt, generated as one left-padded batch."""
        batch = stack_prompts([Prompt(torch.tensor([i])) for i in prompt_ids], self.pad,
                              self.engine.cfg.audio_config.pad_token_id)
        new = self.engine.generate(batch, self.generation(batch_no)).new_text_ids  # [B, T]
        return [self._answer_text(row) for row in new.tolist()]

    async def _answer_continuously(self, todo: list[DistillPrompt], on_answer) -> None:
        """Greedy answers with continuous batching (the server's scheduler): a finished row leaves and the next
        prompt joins at once, so no row waits for the longest answer of a batch (about 2x the throughput of fixed
        batches here). Each row computes what it computes alone, so an answer does not depend on which prompts
        shared its steps, and a resumed run gives the same answers as an uninterrupted one."""
        from funaudiochat.serve.scheduler import Request, Scheduler

        rows = max(1, self.settings.batch_size)
        scheduler = Scheduler(self.engine, self.tok, max_sessions=rows, max_waiting=rows, wait_timeout_s=3600)
        scheduler.start()
        slots = asyncio.Semaphore(rows)
        # the s2t preset stops at <|im_end|> only: generation may run on past an <|endoftext|>, cut like `answer`
        generation = {"max_new_tokens": self.settings.max_new_tokens, "do_sample": False, "repetition_penalty": 1.0}

        async def one(p: DistillPrompt):
            async with slots:
                session = await scheduler.submit(Request(messages=self.messages(p), mode="s2t", generation=generation))
                async for event in session:
                    end = event
            on_answer(p, self._answer_text(list(end.text_ids)))

        try:
            await asyncio.gather(*(one(p) for p in todo))
        finally:
            await scheduler.stop()

    def run(self, prompts: list[DistillPrompt], out: str | Path, progress: bool = True) -> DistillReport:
        """Answer every prompt not yet in OUT's files, append the records batch by batch, write the report."""
        kept_path, rejected_path, report_path = output_paths(out)
        kept_path.parent.mkdir(parents=True, exist_ok=True)
        report = DistillReport(prompts=len(prompts))
        done = done_ids(kept_path, rejected_path)
        unique = list({p.id: p for p in prompts}.values())
        todo = [p for p in unique if p.id not in done]
        report.already_done = len(unique) - len(todo)
        budget = self.engine.max_seq_len - self.settings.max_new_tokens
        encoded = {p.id: self.encode(p) for p in todo}
        todo.sort(key=lambda p: len(encoded[p.id]))  # similar lengths share a batch: less padding
        t0 = time.perf_counter()
        bar = _progress(len(todo), progress)
        step = max(1, self.settings.batch_size)
        try:
            with fileio.storage_errors(kept_path), open(kept_path, "a", encoding="utf-8") as kept, \
                    open(rejected_path, "a", encoding="utf-8") as rejected:
                def record(p: DistillPrompt, answer: tuple[str, bool, int] | None) -> None:
                    self._record(p, answer, report, kept, rejected)
                    kept.flush()
                    rejected.flush()
                    bar.update(1)
                    bar.set_postfix(kept=report.kept, rejected=sum(report.rejected.values()))

                for p in todo:
                    if len(encoded[p.id]) > budget:
                        record(p, None)
                todo = [p for p in todo if len(encoded[p.id]) <= budget]
                if self.settings.greedy:
                    asyncio.run(self._answer_continuously(todo, record))
                else:  # sampled: fixed batches, each seeded by its number
                    for batch_no, start in enumerate(range(0, len(todo), step)):
                        batch = todo[start:start + step]
                        for p, answer in zip(batch, self.answer([encoded[p.id] for p in batch], batch_no)):
                            record(p, answer)
        finally:
            bar.close()
            report.seconds = time.perf_counter() - t0
            fileio.write_text(report_path, json.dumps(report.to_dict(), indent=2) + "\n")
        return report

    def _record(self, p: DistillPrompt, answer: tuple[str, bool, int] | None, report: DistillReport,
                kept, rejected) -> None:
        """Judge one answer (None: the prompt did not fit the context), write it to its file, count it."""
        text, finished, n_new = answer or ("", False, 0)
        reason = "prompt_too_long" if answer is None else reject_reason(p, text, finished, self.filters)
        rec = {"id": p.id, "family": p.family, "system": system_for(p, self.settings.system), "prompt": p.prompt,
               "answer": text, "finished": finished, "new_tokens": n_new}
        if p.family == TOOL_FAMILY and reason is None:
            rec["tool_calls"] = [asdict(c) for c in parse_tool_calls(text).calls]
        family = report.by_family.setdefault(p.family, {"kept": 0, "rejected": 0})
        if reason is None:
            report.kept += 1
            family["kept"] += 1
            kept.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            report.rejected[reason] += 1
            family["rejected"] += 1
            rejected.write(json.dumps({**rec, "reason": reason}, ensure_ascii=False) + "\n")
        report.new_tokens += n_new
        report.processed += 1


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="distill", unit="prompt", disable=not enabled, dynamic_ncols=True)

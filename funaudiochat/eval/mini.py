"""fun-audio-chat-mini's must-show figures (issue 12) on a split that `funaudiochat data build-mini` wrote.

    asr          WER of the model's transcripts ("Please help me transcribe the audio.") on the split's ASR records,
                 with Whisper tiny.en's WER on the same clips beside it (the reference)
    spoken_qa    accuracy from speech on the gold subset (QA records whose answer is a word or a number, checked by
                 containment: distill.matches_expected) vs the base's typed accuracy (the typed answer the data
                 build recorded: the base SmolLM2's greedy answer through our engine, or the --base model's anew)
    agreement    the spoken answer says what the base says to the typed question, on the gold subset as the issue
                 scores it: same first sentence or the same gold verdict (`agreement_all_qa`: over every QA record,
                 where an item without a gold answer agrees only by its first sentence)
    robustness   spoken-QA accuracy on the split's 10 dB SNR and telephone-band copies vs clean
    retention    typed accuracy of the model (and of a --baseline, e.g. the single-stage run) vs the base's
    latency      end of a 5 s spoken question (the clip with leading silence up to 5 s) -> first text token of a new
                 conversation as `chat` and `serve` run one (the system turn's keys and values computed once per
                 engine): features + encoder + word reader + prefill + first step, p50 / p95, eager (and compiled)

Everything is greedy text (the s2t preset; the speech head never runs), with the weights as stored or cast to
`dtype` (every model the report loads). Targets are the issue's thresholds.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from funaudiochat import fileio
from funaudiochat.audio.io import load_audio
from funaudiochat.data.distill import matches_expected
from funaudiochat.errors import InputError
from funaudiochat.eval.asr import error_rates
from funaudiochat.eval.normalize import normalize_english
from funaudiochat.text.tokenizer import AUDIO_TEMPLATE

log = logging.getLogger(__name__)

RATE = 16000
LATENCY_SECONDS = 5.0
ROBUST_SPLITS = {"snr10": "_snr10", "phone": "_phone"}
TARGETS = {"asr_wer": 0.12, "spoken_vs_typed": 0.9, "agreement": 0.8, "robust_snr10": 0.85, "robust_phone": 0.85,
           "retention": 0.95, "latency_p50_s": 0.3}


# ---------------------------------------------------------------------------------------------------- records
@dataclass
class Record:
    id: str
    task: str                    # qa | asr
    system: str
    messages: list[dict]         # the conversation up to the last user turn (audio placeholders)
    wavs: list[Path]             # one per user turn
    answer: str                  # the record's target (ASR: the transcript)
    questions: list[str]         # QA: the typed questions, one per user turn
    expected: list[str]          # QA: gold answers (empty: no gold answer)
    typed_answer: str            # QA: the base's typed answer to the last question

    @property
    def gold(self) -> bool:
        return self.task == "qa" and bool(self.expected)


def read_split(data_dir: str | Path, split: str, limit: int | None = None) -> list[Record]:
    """The records of DATA/SPLIT.jsonl (first `limit` of each task)."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise InputError(f"{path}: no such split file (`funaudiochat data build-mini --out {data_dir}` writes "
                         f"train/dev/test.jsonl and test_snr10/test_phone.jsonl)")
    records, seen = [], {"qa": 0, "asr": 0}
    for lineno, row in fileio.read_jsonl(path):
        if not isinstance(row, dict):
            raise InputError(f"{path}: {row}")
        try:
            rec = _record(row, path.parent)
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{path}:{lineno}: not a build-mini record ({err!r})") from None
        if limit is not None and seen.get(rec.task, 0) >= limit:
            continue
        seen[rec.task] = seen.get(rec.task, 0) + 1
        records.append(rec)
    if not records:
        raise InputError(f"{path}: no records")
    return records


def _record(row: dict, folder: Path) -> Record:
    task = row.get("task", "qa")
    if task not in ("qa", "asr"):
        raise ValueError(f"task {task!r}")
    messages = list(row["messages"])
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's")
    wavs = []
    for entry in row["audio"]:
        entry = json.loads(entry) if isinstance(entry, str) else entry
        wavs.append(folder / entry["path"])
    meta = row.get("meta") or {}
    return Record(id=str(row["id"]), task=task, system=row.get("system") or "", messages=messages[:-1], wavs=wavs,
                  answer=messages[-1]["content"], questions=list(meta.get("questions") or []),
                  expected=[str(e) for e in meta.get("expected") or []], typed_answer=meta.get("typed_answer") or "")


def spoken_messages(rec: Record) -> list[dict]:
    return ([{"role": "system", "content": rec.system}] if rec.system else []) + rec.messages


def typed_messages(rec: Record) -> list[dict]:
    """The same conversation with every spoken user turn replaced by its text."""
    out, turn = [], 0
    for m in rec.messages:
        if m["role"] == "user" and AUDIO_TEMPLATE in m["content"]:
            if turn >= len(rec.questions):
                raise InputError(f"{rec.id}: {len(rec.questions)} typed question(s) for more spoken turns")
            m = {"role": "user", "content": m["content"].replace(AUDIO_TEMPLATE, rec.questions[turn]).strip()}
            turn += 1
        out.append(m)
    return ([{"role": "system", "content": rec.system}] if rec.system else []) + out


# ---------------------------------------------------------------------------------------------------- scoring
def first_sentence(text: str) -> str:
    from funaudiochat.data.build_mini import first_sentence as split_first

    return normalize_english(split_first(text))


def accuracy(answers: list[str], expected: list[list[str]]) -> float | None:
    if not answers:
        return None
    return sum(matches_expected(a, tuple(e)) for a, e in zip(answers, expected)) / len(answers)


def agrees(spoken: str, typed: str, expected: list[str]) -> bool:
    """Same first sentence, or (gold items) the same gold verdict."""
    if first_sentence(spoken) == first_sentence(typed):
        return True
    return bool(expected) and matches_expected(spoken, tuple(expected)) == matches_expected(typed, tuple(expected))


def agreement_shares(qa: list[Record], spoken: dict[str, str],
                     typed: dict[str, str]) -> tuple[float | None, float]:
    """(share of the gold items whose spoken answer agrees with the typed one, or None without gold items; the same
    share over every QA record)."""
    agree = {r.id: agrees(spoken[r.id], typed[r.id], r.expected) for r in qa}
    gold = [agree[r.id] for r in qa if r.gold]
    return (sum(gold) / len(gold) if gold else None), sum(agree.values()) / len(agree)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None (shown n/a, never a pass) when either is missing or b is 0: a ratio to nothing says nothing."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


# ---------------------------------------------------------------------------------------------------- models
class Answerer:
    """Greedy text answers of one checkpoint (s2t preset), and the time from a finished spoken question to the
    first text token of a new conversation."""

    def __init__(self, model_dir: str | Path, max_new_tokens: int = 128, compile: bool = False,
                 allow_untrained: bool = False, max_seq_len: int = 2048, dtype: str | None = None):
        from funaudiochat.engine.loading import load_runtime
        from funaudiochat.engine.presets import generation_preset

        rt = load_runtime(model_dir, dtype=dtype, speech=False, compile=compile, max_seq_len=max_seq_len)
        self.engine, self.tokenizer = rt.engine, rt.tokenizer
        self.gen = generation_preset("s2t", self.tokenizer, self.engine.cfg, max_new_tokens=max_new_tokens)
        self.allow_untrained = allow_untrained
        self.name = str(model_dir)

    def answer(self, messages: list[dict], audios: list[np.ndarray] = ()) -> str:
        """The greedy answer text to a whole conversation."""
        from funaudiochat.engine.events import TurnEnd, stream_turn
        from funaudiochat.engine.inputs import check_trained
        from funaudiochat.engine.prompt import build_prompt

        if audios:
            check_trained(self.engine.cfg, True, False, self.allow_untrained)
        prompt = build_prompt(self.tokenizer, self.engine.cfg, messages, list(audios))
        end = None
        for event in stream_turn(self.engine, prompt, self.gen, self.tokenizer):
            if isinstance(event, TurnEnd):
                end = event
        return end.text.strip()

    def first_text_latency(self, system: str | None, audio: np.ndarray) -> float:
        """Seconds from a new conversation's spoken question to its first text, run as `chat` and `serve` run a
        conversation (a ChatSession: the system turn's keys and values are computed once per engine and copied
        into each new conversation). The answer is cancelled there."""
        from funaudiochat.engine.events import TextDelta
        from funaudiochat.engine.session import ChatSession

        session = ChatSession(self.engine, self.tokenizer, self.gen, system=system,
                              allow_untrained=self.allow_untrained)
        cancel, first = threading.Event(), None
        t0 = time.perf_counter()
        for event in session.ask(audio=audio, cancel=cancel):  # to its end: the system turn is stored there
            if first is None and isinstance(event, TextDelta):
                first = time.perf_counter() - t0
                cancel.set()
        session.close()
        return first if first is not None else time.perf_counter() - t0  # (no text: its whole time)


def _audios(rec: Record) -> list[np.ndarray]:
    return [load_audio(p, RATE) for p in rec.wavs]


def five_seconds(wav: np.ndarray) -> np.ndarray:
    """A question that ends at 5 s: leading silence up to 5 s (a longer clip is kept whole)."""
    pad = max(0, int(LATENCY_SECONDS * RATE) - len(wav))
    return np.concatenate([np.zeros(pad, dtype=np.float32), wav.astype(np.float32)])


# ---------------------------------------------------------------------------------------------------- the report
def evaluate(model: str | Path, data: str | Path, split: str = "test", limit: int | None = None,
             base: str | Path | None = None, baseline: str | Path | None = None, whisper: bool = True,
             latency_n: int = 50, compiled: bool = False, max_new_tokens: int = 128,
             allow_untrained: bool = False, progress: bool = False, dtype: str | None = None) -> dict:
    records = read_split(data, split, limit)
    asr = [r for r in records if r.task == "asr"]
    qa = [r for r in records if r.task == "qa"]
    gold = [r for r in qa if r.gold]
    me = Answerer(model, max_new_tokens, allow_untrained=allow_untrained, dtype=dtype)
    bar = _bar(progress)
    report: dict = {"model": str(model), "data": str(data), "split": split, "limit": limit,
                    "dtype": dtype or "as stored",
                    "counts": {"asr": len(asr), "qa": len(qa), "gold": len(gold)}, "targets": TARGETS}

    # ASR: ours, and Whisper tiny.en on the same clips
    if asr:
        hyps = [_step(bar, me.answer(spoken_messages(r), _audios(r))) for r in asr]
        refs = [r.answer for r in asr]
        report["asr"] = {"wer": _wer(refs, hyps), "items": [{"id": r.id, "reference": r.answer, "hypothesis": h}
                                                            for r, h in zip(asr, hyps)]}
        if whisper:
            from funaudiochat.eval.asr import AsrJudge

            judge = AsrJudge()
            whisper_hyps = [judge.transcribe(load_audio(r.wavs[0], RATE), RATE) for r in asr]
            report["asr"]["whisper_tiny_en_wer"] = _wer(refs, whisper_hyps)

    # spoken QA, agreement with the base's typed answers, typed accuracy (retention)
    if qa:
        spoken = {r.id: _step(bar, me.answer(spoken_messages(r), _audios(r))) for r in qa}
        if base is not None:
            other = Answerer(base, max_new_tokens, allow_untrained=True, dtype=dtype)
            base_typed = {r.id: _step(bar, other.answer(typed_messages(r))) for r in qa}
        else:
            base_typed = {r.id: r.typed_answer for r in qa}
        my_typed = {r.id: _step(bar, me.answer(typed_messages(r))) for r in gold}
        expected = [r.expected for r in gold]
        acc_spoken = accuracy([spoken[r.id] for r in gold], expected)
        acc_base = accuracy([base_typed[r.id] for r in gold], expected)
        acc_typed = accuracy([my_typed[r.id] for r in gold], expected)
        report["spoken_qa"] = {"accuracy_spoken": acc_spoken, "accuracy_base_typed": acc_base,
                               "ratio": ratio(acc_spoken, acc_base),
                               "base_typed_source": str(base) if base else "recorded by the data build"}
        report["agreement"], report["agreement_all_qa"] = agreement_shares(qa, spoken, base_typed)
        report["retention"] = {"accuracy_typed": acc_typed, "accuracy_base_typed": acc_base,
                               "ratio": ratio(acc_typed, acc_base)}
        if baseline is not None:
            other = Answerer(baseline, max_new_tokens, allow_untrained=True, dtype=dtype)
            acc = accuracy([_step(bar, other.answer(typed_messages(r))) for r in gold], expected)
            report["retention"]["baseline"] = {"model": str(baseline), "accuracy_typed": acc,
                                               "ratio": ratio(acc, acc_base)}
        report["qa_items"] = [{"id": r.id, "spoken": spoken[r.id], "base_typed": base_typed[r.id],
                               "typed": my_typed.get(r.id), "expected": r.expected} for r in qa]

        # robustness: the same gold items, noisy and telephone-band copies
        report["robustness"] = {}
        for name, suffix in ROBUST_SPLITS.items():
            path = Path(data) / f"{split}{suffix}.jsonl"
            if not path.is_file():
                continue
            copies = {r.id: r for r in read_split(data, split + suffix) if r.gold and r.id in spoken}
            items = [r for r in gold if r.id in copies]
            answers = [_step(bar, me.answer(spoken_messages(copies[r.id]), _audios(copies[r.id])))
                       for r in items]
            acc = accuracy(answers, [r.expected for r in items])
            clean = accuracy([spoken[r.id] for r in items], [r.expected for r in items])
            report["robustness"][name] = {"n": len(items), "accuracy": acc, "clean_accuracy": clean,
                                          "ratio": ratio(acc, clean)}

    # latency: end of a 5 s spoken question -> first text token
    questions = [r for r in qa if len(r.wavs) == 1] or qa
    if latency_n and questions:
        report["latency"] = {"eager": _latency(me, questions, latency_n, bar)}
        if compiled:
            fast = Answerer(model, max_new_tokens, compile=True, allow_untrained=allow_untrained, dtype=dtype)
            _latency(fast, questions, 2, None)  # compile the graphs first
            report["latency"]["compiled"] = _latency(fast, questions, latency_n, None)
    if bar is not None:
        bar.close()
    report["summary"] = summary(report)
    return report


def _latency(me: Answerer, questions: list[Record], n: int, bar) -> dict:
    times = []
    for i in range(n):
        rec = questions[i % len(questions)]
        audio = five_seconds(load_audio(rec.wavs[-1], RATE))  # the last question alone
        times.append(me.first_text_latency(rec.system or None, audio))
        _step(bar, None)
    return {"n": n, "p50_s": percentile(times, 50), "p95_s": percentile(times, 95)}


def _wer(refs: list[str], hyps: list[str]) -> float | None:
    pairs = [(normalize_english(r), normalize_english(h)) for r, h in zip(refs, hyps)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return None
    return error_rates([r for r, _ in pairs], [h for _, h in pairs])[0]


def _bar(on: bool):
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(desc="eval mini (answers)", unit="answer", dynamic_ncols=True)


def _step(bar, value):
    if bar is not None:
        bar.update(1)
    return value


def summary_row(name: str, value, beside: str, target: str, ok) -> dict:
    """One must-show figure: value, what it is compared with, target, pass (n/a without a value)."""
    return {"figure": name, "value": value, "beside": beside, "target": target,
            "pass": None if value is None else bool(ok)}


def summary(report: dict) -> list[dict]:
    """One row per must-show figure."""
    rows = []

    def row(*args):
        rows.append(summary_row(*args))

    if "asr" in report:
        wer = report["asr"]["wer"]
        row("ASR WER", wer, fmt_beside(report["asr"].get("whisper_tiny_en_wer"), "Whisper tiny.en"),
            f"<= {TARGETS['asr_wer']}", wer is not None and wer <= TARGETS["asr_wer"])
    if "spoken_qa" in report:
        s = report["spoken_qa"]
        row("spoken QA accuracy / base typed", s["ratio"],
            f"{fmt_beside(s['accuracy_spoken'], 'spoken')}, {fmt_beside(s['accuracy_base_typed'], 'base typed')}",
            f">= {TARGETS['spoken_vs_typed']}", s["ratio"] is not None and s["ratio"] >= TARGETS["spoken_vs_typed"])
        agreement = report["agreement"]
        row("agreement with the base's typed answer (gold subset)", agreement,
            fmt_beside(report["agreement_all_qa"], "every QA item"), f">= {TARGETS['agreement']}",
            agreement is not None and agreement >= TARGETS["agreement"])
        for name, r in report.get("robustness", {}).items():
            row(f"robustness {name} / clean", r["ratio"], f"{fmt_beside(r['accuracy'], name)}, "
                f"{fmt_beside(r['clean_accuracy'], 'clean')}", f">= {TARGETS['robust_' + name]}",
                r["ratio"] is not None and r["ratio"] >= TARGETS["robust_" + name])
        t = report["retention"]
        row("knowledge retention (typed / base typed)", t["ratio"], fmt_beside(t["accuracy_typed"], "typed"),
            f">= {TARGETS['retention']}", t["ratio"] is not None and t["ratio"] >= TARGETS["retention"])
        if "baseline" in t:
            b = t["baseline"]
            row("retention of the single-stage baseline", b["ratio"], fmt_beside(b["accuracy_typed"], "typed"),
                f">= {TARGETS['retention']}", b["ratio"] is not None and b["ratio"] >= TARGETS["retention"])
    for mode, lat in report.get("latency", {}).items():
        row(f"latency p50 ({mode}), s", lat["p50_s"], fmt_beside(lat["p95_s"], "p95"),
            f"<= {TARGETS['latency_p50_s']}", lat["p50_s"] is not None and lat["p50_s"] <= TARGETS["latency_p50_s"])
    return rows


def fmt_beside(value, label: str) -> str:
    return f"{label} {value:.3f}" if isinstance(value, (int, float)) else f"{label} n/a"


def markdown(report: dict) -> str:
    c = report["counts"]
    title = (f"# fun-audio-chat-mini: {report['model']} ({report.get('dtype', 'as stored')}) on {report['data']} "
             f"({report['split']}: {c['asr']} ASR, {c['qa']} QA, {c['gold']} gold)")
    return summary_table(title, report["summary"])


def summary_table(title: str, rows: list[dict]) -> str:
    """A report's summary rows as a markdown table under `title`."""
    lines = [title, "", "| figure | value | beside | target | pass |", "|---|---|---|---|---|"]
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:.3f}"
        verdict = "n/a" if r["pass"] is None else ("yes" if r["pass"] else "NO")
        lines.append(f"| {r['figure']} | {value} | {r['beside']} | {r['target']} | {verdict} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j = fileio.write_text(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    m = fileio.write_text(out_dir / "report.md", markdown(report))
    return j, m


"""The evaluation runner: answer a suite's items with a model, append each prediction as it is made, score, report.

Layout of OUT/SUITE/: `predictions.jsonl` (or `predictions.shard-I-of-N.jsonl` with --shard; one line per item:
id, response, or error), `records.jsonl` and `summary.json` (the scorer's). OUT/summary.json, OUT/report.md and
OUT/scores.png cover all suites. A rerun skips items already answered in the predictions file (resume after an
interrupt) and tries failed ones again (the later line wins); `merge` joins shard files and scores.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from funaudiochat import fileio
from funaudiochat.errors import FunAudioChatError, InputError
from funaudiochat.eval.run import suites


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--shard {text!r}: expected I/N, e.g. 0/2") from None
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def predictions_path(out: Path, shard: tuple[int, int] | None) -> Path:
    return out / ("predictions.jsonl" if shard is None else f"predictions.shard-{shard[0]}-of-{shard[1]}.jsonl")


def read_predictions(path: Path) -> dict[str, dict]:
    """id -> prediction line (the last one for an id); a torn last line (an interrupt while writing) is ignored, so
    that item is redone."""
    done = {}
    if path.is_file():
        for _, line in fileio.read_jsonl(path):
            if isinstance(line, dict) and "id" in line:
                done[line["id"]] = line
    return done


def _append(path: Path, record: dict) -> None:
    with fileio.storage_errors(path), open(path, "a", encoding="utf-8") as f:  # a full disk: one StorageError
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def predict(suite_dir: Path, model, out: Path, shard: tuple[int, int] | None = None, progress: bool = True,
            batch_size: int = 1) -> int:
    """Answer the suite's items (this shard's) not answered yet, `batch_size` at a time where the model can batch;
    returns how many were attempted now. A speech-quality suite is not answered by a model that does not speak
    (its items are then scored as failed, saying why); -1 says so."""
    from tqdm import tqdm

    items = suites.read_items(suite_dir)
    if shard is not None:
        items = [item for k, item in enumerate(items) if k % shard[1] == shard[0]]
    out.mkdir(parents=True, exist_ok=True)
    path = predictions_path(out, shard)
    if not getattr(model, "speech", False) and (suite_dir / "suite.json").is_file() \
            and suites.scorer_of(suite_dir) == "speech":
        path.touch()  # an empty prediction file, so that `merge` finds this suite's shard too
        return -1
    done = read_predictions(path)
    if path.is_file() and path.read_bytes()[-1:] not in (b"", b"\n"):  # torn last line: end it so appends stay whole
        with fileio.storage_errors(path), open(path, "a", encoding="utf-8") as f:
            f.write("\n")
    todo = [item for item in items if "response" not in done.get(item["id"], {})]  # failed items are tried again
    batch_size = batch_size if hasattr(model, "answer_batch") else 1
    with tqdm(total=len(todo), desc=suite_dir.name, disable=not progress, unit="item") as bar:
        for start in range(0, len(todo), batch_size):
            for record in _answer(suite_dir, model, todo[start:start + batch_size], out):
                _append(path, record)
            bar.update(len(todo[start:start + batch_size]))
    return len(todo)


def _keep(record: dict, answer, out: Path) -> None:
    """Put an answer on its record: the text as `response`; a spoken answer's wav saved as OUT/answers/ID.wav
    (`audio`, relative to OUT; `no_audio` when the model gave no speech)."""
    if isinstance(answer, str):
        record["response"] = answer
        return
    from funaudiochat.audio.io import save_wav

    record["response"] = answer.text
    if answer.wav is None or not len(answer.wav):
        record["no_audio"] = True
        return
    wav = out / "answers" / f"{record['id']}.wav"
    with fileio.atomic_path(wav) as tmp:
        save_wav(tmp, answer.wav, answer.rate)
    record["audio"] = f"answers/{wav.name}"


def _answer(suite_dir: Path, model, items: list[dict], out: Path) -> list[dict]:
    """One record per item: its response, or the error that stopped it (the others still get answered)."""
    records = [{"id": item["id"]} for item in items]
    ready = []
    for record, item in zip(records, items):
        audio = suite_dir / item["audio"]
        if audio.is_file():
            ready.append((record, (audio, item.get("text"), item.get("tools"))))
        else:
            record["error"] = f"missing audio {audio}"
    try:
        if len(ready) > 1:
            answers = model.answer_batch([request for _, request in ready])
        else:
            answers = [model.answer(*request) for _, request in ready]
        for (record, _), answer in zip(ready, answers):
            _keep(record, answer, out)
    except FunAudioChatError as err:
        if len(ready) == 1:
            ready[0][0]["error"] = str(err)
        else:  # find which item of the batch fails: one at a time
            for record, request in ready:
                try:
                    _keep(record, model.answer(*request), out)
                except FunAudioChatError as one:
                    record["error"] = str(one)
    return records


def merge(out: Path) -> Path:
    """Join OUT/predictions.shard-*.jsonl into OUT/predictions.jsonl (items in any order, one line per id)."""
    shards = sorted(out.glob("predictions.shard-*-of-*.jsonl"))
    if not shards:
        raise InputError(f"{out}: no predictions.shard-*.jsonl to merge")
    joined = read_predictions(out / "predictions.jsonl")
    for shard in shards:
        joined.update(read_predictions(shard))
    fileio.write_text(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                         for r in joined.values()))
    return out / "predictions.jsonl"


# ------------------------------------------------------------------------------------------------- scoring

def _score_asr(items: list[dict], responses: dict) -> tuple[list[dict], dict]:
    from funaudiochat.eval.asr import error_rates
    from funaudiochat.eval.normalize import normalize_english

    records, refs, hyps = [], [], []
    for item in items:
        ref = normalize_english(item["reference"])
        if item["id"] not in responses:
            records.append({"id": item["id"], "error": "no prediction"})
            continue
        hyp = normalize_english(responses[item["id"]])
        wer, _ = error_rates([ref], [hyp]) if ref else (None, None)
        records.append({"id": item["id"], "reference": ref, "hypothesis": hyp, "wer": wer})
        refs.append(ref)
        hyps.append(hyp)
    summary = {"items": len(items), "scored": len(refs), "failed": len(items) - len(refs)}
    if refs:
        wer, cer = error_rates(refs, hyps)
        summary.update({"wer": 100 * wer, "cer": 100 * cer})
    return records, summary


@functools.lru_cache(maxsize=1)
def asr_judge():
    """The ASR judge (Whisper tiny.en), loaded once, on first use."""
    from funaudiochat.eval.asr import AsrJudge

    return AsrJudge()


def _spoken_answers(items: list[dict], predictions: dict, out: Path) -> list[dict]:
    """The speech-quality scorer's input: per item its answer's text and wav, or why there is none."""
    from funaudiochat.audio.io import load_audio

    answers = []
    for item in items:
        line = predictions.get(item["id"], {})
        answer = {"id": item["id"], **{k: item[k] for k in ("style", "neutral") if k in item}}
        if not line:
            answer["error"] = "not answered: its answers must be spoken (eval run --mode s2s)"
        elif "response" not in line:
            answer["error"] = line.get("error", "no prediction")
        elif "audio" not in line:
            answer["error"] = "the answer has no speech" + ("" if line.get("no_audio") else
                                                            " (answer with --mode s2s)")
        else:
            try:
                answer.update(text=line["response"], wav=load_audio(out / line["audio"], 16000), rate=16000)
            except FunAudioChatError as err:
                answer["error"] = f"cannot read the answer's speech: {err}"
        answers.append(answer)
    return answers


def _score_speech(items: list[dict], predictions: dict, out: Path) -> tuple[list[dict], dict]:
    from funaudiochat.eval import speech_quality

    answers = _spoken_answers(items, predictions, out)
    if all("error" in a for a in answers):  # nothing to transcribe: do not load the ASR judge
        return speech_quality.score(answers, None)
    return speech_quality.score(answers, asr_judge())


def _mcq_lines(items: list[dict], predictions: dict, benchmark: str) -> list[tuple[int, dict]]:
    """MMAU entries carry the answer as model_output, MMSU ones as response (the published formats)."""
    key = "model_output" if benchmark == "mmau" else "response"
    lines = []
    for k, item in enumerate(items):
        line = predictions.get(item["id"], {})
        entry = {kk: v for kk, v in item.items() if kk not in ("audio", "text")}
        if "response" in line:
            entry[key] = line["response"]
        else:
            entry["error"] = line.get("error", "no prediction")
        lines.append((k + 1, entry))
    return lines


def score(suite_dir: Path, out: Path, judge=None) -> dict:
    """Score OUT/predictions.jsonl with the suite's scorer; write records.jsonl and summary.json; return the summary
    with `metric` (name) and `value` (the headline number). Answers that have speech (S2S) also get the
    speech-quality scorer's summary under `speech` (its records in speech_records.jsonl)."""
    items = suites.read_items(suite_dir)
    predictions = read_predictions(out / "predictions.jsonl")
    responses = {k: v["response"] for k, v in predictions.items() if "response" in v}
    scorer = suites.scorer_of(suite_dir)
    speech = None
    if scorer == "asr":
        records, summary = _score_asr(items, responses)
        metric = "wer"
    elif scorer == "speech":
        records, summary = _score_speech(items, predictions, out)
        metric = "wer"
    elif scorer in ("mmau", "mmsu"):
        from funaudiochat.eval import audio_mcq

        records, summary = audio_mcq.score_lines(_mcq_lines(items, predictions, scorer), scorer)
        metric = "acc"
    else:
        lines = [(k + 1, dict(item, response=responses[item["id"]]) if item["id"] in responses else
                  {"id": item["id"], "error": predictions.get(item["id"], {}).get("error", "no prediction")})
                 for k, item in enumerate(items)]
        if scorer.startswith("speechfc:"):
            from funaudiochat.eval.speechfc.score import Setup, score_lines

            _, kind, category = scorer.split(":")
            for _, line in lines:  # the scorer reads "predict"; an item not answered reads as an empty prediction
                line["predict"] = line.pop("response", "")
            records, summary = score_lines(lines, Setup(kind, category))
            summary["items"] = summary["total"]
            metric = "accuracy"
        else:
            from funaudiochat.eval.voicebench.score import SUBSETS, score_lines

            subset = scorer.split(":")[1]
            records, summary = score_lines(lines, subset, judge)
            metric = {"mcq": "acc", "bbh": "acc", "refusal": "refusal_rate", "ifeval": "final"}.get(SUBSETS[subset],
                                                                                                    "gpt")
    if scorer != "speech" and any("audio" in p for p in predictions.values()):
        speech_records, speech = _score_speech(items, predictions, out)
        fileio.write_text(out / "speech_records.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in speech_records))
        summary["speech"] = speech
    summary.update({"suite": suite_dir.name, "scorer": scorer, "metric": metric, "value": summary.get(metric),
                    "prediction_errors": sum("error" in p for p in predictions.values())})
    fileio.write_text(out / "records.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    fileio.write_text(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return summary


# -------------------------------------------------------------------------------------------------- report

OPEN_SUBSETS = ("alpacaeval", "alpacaeval_full", "commoneval", "wildvoice")


def _percent(summary: dict) -> float | None:
    value = summary.get("value")
    if value is None:
        return None
    if summary["metric"] in ("accuracy", "refusal_rate", "final"):
        return 100 * value
    if summary["metric"] == "gpt" and summary["scorer"].split(":")[-1] in OPEN_SUBSETS:
        return 20 * value  # a 1-5 rating, x20 as VoiceBench's overall score counts it
    return value


def write_report(out: Path, summaries: list[dict], model_label: str) -> None:
    """OUT/summary.json, OUT/report.md and OUT/scores.png (one bar per suite, in percent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fileio.write_text(out / "summary.json", json.dumps({"model": model_label, "suites": summaries}, indent=1) + "\n")
    lines = [f"# Evaluation report: {model_label}", "", "| suite | scorer | metric | value | items | failed |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        value = _percent(s)
        shown = "n/a" if value is None else f"{value:.2f} %"
        if value is not None and s["metric"] == "gpt" and value != s["value"]:
            shown = f"{s['value']:.2f} / 5 ({value:.1f} %)"
        lines.append(f"| {s['suite']} | {s['scorer']} | {s['metric']} | {shown} | {s.get('items', '')} | "
                     f"{s.get('failed', 0) + s.get('prediction_errors', 0)} |")
    lines += ["", "WER: lower is better; the others: higher is better (refusal_rate on harmful requests). A judge's "
              "1-5 rating counts x20 in the chart, as in VoiceBench's overall score.", ""]
    spoken = [(s["suite"], s if s["scorer"] == "speech" else s["speech"]) for s in summaries
              if s["scorer"] == "speech" or "speech" in s]
    if spoken:
        lines += ["## Speech of the answers", "", "| suite | answers with speech | ASR WER vs own text | words/s | "
                  "loudness (dB) | F0 (Hz) | style checks passed |", "|---|---|---|---|---|---|---|"]
        for name, q in spoken:
            def cell(key, fmt):
                return "n/a" if q.get(key) is None else format(q[key], fmt)
            style = f"{q['style_pass']:.0f} % of {q['style_checks']}" if q.get("style_checks") else "n/a"
            lines.append(f"| {name} | {q['scored']} / {q['items']} | {cell('wer', '.1f')} % | "
                         f"{cell('mean_words_per_s', '.2f')} | {cell('mean_loudness_db', '.1f')} | "
                         f"{cell('mean_f0_hz', '.0f')} | {style} |")
        lines.append("")
    lines += ["![scores](scores.png)", ""]
    fileio.write_text(out / "report.md", "\n".join(lines))
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(summaries) + 1.5))
    names = [f"{s['suite']}\n({s['metric']}" + (" 1-5 x20)" if _percent(s) not in (None, s["value"]) and
                                                s["metric"] == "gpt" else ")") for s in summaries]
    values = [_percent(s) or 0.0 for s in summaries]
    bars = ax.barh(names, values, color=["#c0504d" if s["metric"] == "wer" else "#4f81bd" for s in summaries])
    for bar, s, v in zip(bars, summaries, values):
        ax.text(bar.get_width() + 1, bar.get_y() + bar.get_height() / 2,
                "n/a" if _percent(s) is None else f"{v:.1f}", va="center", fontsize=9)
    ax.set_xlim(0, max(100.0, max(values) * 1.15))
    ax.invert_yaxis()
    ax.set_xlabel("percent (WER in red: lower is better)")
    ax.set_title(f"funaudiochat eval: {model_label}", fontsize=10)
    fig.tight_layout()
    with fileio.atomic_path(out / "scores.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)

"""Replay `gen*` golden cases through our engine (see check/model.py for the layout and criteria).

`gen_batch2` records the released code's batch padding leak (SPEC §13 item 4), so it is not compared with its own
outputs: our batched run of its prompts must instead equal the single-prompt goldens `gen` and `gen_single_b` row
by row.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from funaudiochat.check.common import CaseResult, compare
from funaudiochat.engine.generate import Engine, GenerationConfig, Tracer
from funaudiochat.engine.prompt import Prompt

TOL = 1e-4
BATCH_ROWS = {"gen_batch2": ["gen", "gen_single_b"]}


def generation_config(golden: dict, name: str) -> GenerationConfig:
    """The recorded generate kwargs + sp_gen_kwargs of one case (base sp_gen_kwargs as in the golden README)."""
    entry = golden.get("generate", {}).get(name)
    if entry is None:
        raise KeyError(f"golden.json has no generate.{name} entry")
    kw = {"text_greedy": False, "disable_speech": False, "force_text_abos": False}
    kw.update(entry.get("generate_kwargs", {}))
    kw.update(entry.get("sp_gen_kwargs", {}))
    if not kw.pop("only_crq_sampling", True):
        raise ValueError("only_crq_sampling=False is not supported")
    known = GenerationConfig.__dataclass_fields__.keys()
    return GenerationConfig(**{k: (tuple(map(tuple, v)) if k == "bad_words_ids" else v)
                               for k, v in kw.items() if k in known})


def _row_checks(result: CaseResult, ref: dict, tracer: Tracer, gen_out, row: int, label: str) -> None:
    n = ref["new_text_ids"].shape[1]
    ours_text = gen_out.new_text_ids[row, :n]
    result.checks.append(compare(f"{label}new_text_ids", ours_text, ref["new_text_ids"][0]))
    if "speech_ids" in ref:
        ours_speech = torch.tensor(gen_out.speech_ids[row], dtype=torch.long)
        result.checks.append(compare(f"{label}speech_ids", ours_speech, ref["speech_ids"][0].long()))
    pairs = [("step_text_logits", tracer.text_logits, 1), ("step_text_scores", tracer.text_scores, 1),
             ("crq_call_logits", tracer.srh_logits, 5), ("crq_call_scores", tracer.srh_scores, 5),
             ("crq_call_tokens", tracer.srh_tokens, 5)]
    for name, seq, per_step in pairs:
        if name not in ref:
            continue
        if ref[name].numel() == 0:  # no SRH call recorded (speech disabled): we must not have made any either
            result.checks.append(compare(f"{label}{name} (count)", torch.tensor(len(seq)), torch.tensor(0)))
            continue
        steps = per_step * n
        if len(seq) < steps:
            result.checks.append(compare(f"{label}{name}", torch.zeros(len(seq)), torch.zeros(steps)))
            continue
        ours = torch.stack(seq[:steps])[:, row]
        refv = ref[name][:, 0]
        if name.endswith("scores"):  # -inf entries (filtered tokens) must match as -inf
            same_inf = torch.isinf(ours) == torch.isinf(refv)
            ours, refv = ours.masked_fill(~torch.isfinite(ours), 0), refv.masked_fill(~torch.isfinite(refv), 0)
            if not bool(same_inf.all()):
                result.checks.append(compare(f"{label}{name} (-inf pattern)", same_inf.long(),
                                             torch.ones_like(same_inf).long()))
        result.checks.append(compare(f"{label}{name}", ours, refv, TOL))


def check_gen_case(model, case_dir: Path, golden: dict) -> CaseResult:
    name = case_dir.name
    inputs = load_file(str(case_dir / "inputs.safetensors"))
    result = CaseResult(name)
    engine = Engine(model)
    tracer = Tracer()
    gen = generation_config(golden, name)
    out = engine.generate(Prompt.from_tensors(inputs), gen, tracer)
    if name in BATCH_ROWS:
        result.case = f"{name} (batched rows vs {', '.join(BATCH_ROWS[name])})"
        for row, single in enumerate(BATCH_ROWS[name]):
            single_dir = case_dir.parent / single
            if not (single_dir / "outputs.safetensors").exists():
                result.error = f"needs {single}/ to compare row {row}"
                return result
            _row_checks(result, load_file(str(single_dir / "outputs.safetensors")), tracer, out, row, f"row{row}.")
        return result
    ref = load_file(str(case_dir / "outputs.safetensors"))
    if "sequences" in ref:
        result.checks.append(compare("sequences", out.sequences, ref["sequences"]))
    _row_checks(result, ref, tracer, out, 0, "")
    if "prefill_inputs_embeds" in ref and tracer.prefill_embeds is not None:
        result.diagnostics.append(compare("prefill_inputs_embeds", tracer.prefill_embeds, ref["prefill_inputs_embeds"]))
    return result

"""Replay Fun-Audio-Chat model goldens (`train_fwd*`, `gen*`) and compare with the recorded outputs.

Layout (shared/golden/README.md): DIR/model/{config.json, model.safetensors}, DIR/golden.json, and one folder per case
with inputs.safetensors, outputs.safetensors and (training) intermediates.safetensors.
Criteria: losses within 1e-4 relative; logits max abs diff <= 1e-4 * max|ref|; generated ids identical.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from funaudiochat.check.common import CaseResult, compare
from funaudiochat.model.checkpoint import load_model

TOL = 1e-4
# intermediates recorded by the golden harness -> our trace names
TRACE_NAMES = {"speech_label_embeds": "crq_audio_embeds"}
TRACE_ORDER = ["cont_audio_features", "audio_tower_fused", "lm_inputs_embeds", "lm_labels", "lm_last_hidden",
               "crq_inputs_embeds", "crq_speech_labels", "crq_audio_embeds", "speech_label_embeds"]


def check_train_case(model, case_dir: Path) -> CaseResult:
    inputs = load_file(str(case_dir / "inputs.safetensors"))
    ref = load_file(str(case_dir / "outputs.safetensors"))
    result = CaseResult(case_dir.name)
    trace: dict = {}
    with torch.no_grad():
        out = model(**inputs, output_router_logits=True if "aux_loss" in ref else None, trace=trace)
    for name in ("loss", "text_loss", "speech_loss", "aux_loss"):
        if name in ref:
            ours = getattr(out, name)
            if ours is None:
                result.checks.append(compare(f"{name} (not computed)", torch.tensor(float("inf")), ref[name]))
            else:
                result.checks.append(compare(name, ours.reshape(ref[name].shape), ref[name], TOL))
    for name in ("text_logits", "speech_logits"):
        if name in ref:
            ours = getattr(out, name)
            result.checks.append(compare(name, ours if ours is not None else torch.zeros(0), ref[name], TOL))
    inter_path = case_dir / "intermediates.safetensors"
    if inter_path.exists():
        inter = load_file(str(inter_path))
        for name in sorted(inter, key=lambda n: TRACE_ORDER.index(n) if n in TRACE_ORDER else 99):
            ours = trace.get(TRACE_NAMES.get(name, name))
            if ours is not None:
                result.diagnostics.append(compare(name, ours, inter[name], TOL))
    return result


def run(directory: Path, args=None) -> list[CaseResult]:
    model = load_model(directory / "model", dtype=torch.float32)
    golden = json.loads((directory / "golden.json").read_text()) if (directory / "golden.json").exists() else {}
    results = []
    for case_dir in sorted(p for p in directory.iterdir() if (p / "inputs.safetensors").exists()):
        try:
            if case_dir.name.startswith("train_fwd"):
                results.append(check_train_case(model, case_dir))
            elif case_dir.name.startswith("gen"):
                from funaudiochat.check.generation import check_gen_case
                results.append(check_gen_case(model, case_dir, golden))
        except Exception as err:  # one broken case must not hide the others
            results.append(CaseResult(case_dir.name, error=f"{type(err).__name__}: {err}"))
    return results

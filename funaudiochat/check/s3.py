"""Check the S3 speech tokenizer against an s3v3-tiny-style golden directory.

Files: config.json (sizes), s3tokenizer_v2_tiny.pt (state dict), s3_io.safetensors (waves, mels, codes, hidden).
Codes must match exactly on their valid part ([:len]); the encoder hidden state to 1e-4 * max|ref| on valid frames.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from funaudiochat.audio.mel import log_mel
from funaudiochat.check.common import CaseResult, compare
from funaudiochat.errors import CheckpointError
from funaudiochat.speech.s3tokenizer import S3Tokenizer, S3TokenizerConfig, tokenize_audio

HIDDEN_TOL = 1e-4
MEL_TOL = 1e-4


def load_golden_tokenizer(directory: Path) -> S3Tokenizer:
    """The golden's tokenizer: sizes from config.json, weights from the one `.pt` state dict, strictly."""
    config = S3TokenizerConfig.from_dict(json.loads((directory / "config.json").read_text()))
    weights = sorted(directory.glob("*.pt"))
    if len(weights) != 1:
        raise CheckpointError(f"{directory}: expected one .pt state dict, found {[w.name for w in weights]}")
    model = S3Tokenizer(config)
    model.load_state_dict(torch.load(weights[0], map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def _valid(codes: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    return [codes[i, : int(n)] for i, n in enumerate(lengths)]


def _case(name: str, fn) -> CaseResult:
    """Run one case; an exception becomes that case's error line instead of aborting the whole check."""
    try:
        return CaseResult(name, checks=fn())
    except Exception as err:  # noqa: BLE001 - reported per case
        return CaseResult(name, error=f"{type(err).__name__}: {err}")


def run(directory: Path, args=None) -> list[CaseResult]:
    io = load_file(directory / "s3_io.safetensors")
    try:
        model = load_golden_tokenizer(directory)
    except Exception as err:  # noqa: BLE001
        return [CaseResult("load", error=f"{type(err).__name__}: {err}")]

    def single(k: str):
        mel = io[f"mel{k}"][None]
        codes, code_len = model.quantize(mel, torch.tensor([mel.shape[-1]]))
        return [compare(f"codes{k}_len", code_len, io[f"codes{k}_len"]),
                compare(f"codes{k}", codes[0, : int(code_len[0])], io[f"codes{k}"][0])]

    def batch():
        codes, code_len = model.quantize(io["batch_feats"], io["batch_feats_len"])
        ref_len = io["batch_codes_len"]
        checks = [compare("batch_codes_len", code_len, ref_len)]
        for i, (ours, ref) in enumerate(zip(_valid(codes, code_len), _valid(io["batch_codes"], ref_len))):
            checks.append(compare(f"batch_codes[{i}]", ours, ref))
        return checks

    def hidden():
        with torch.no_grad():
            ours, lengths = model.encode(io["batch_feats"], io["batch_feats_len"])
        ref = io["batch_encoder_hidden"]
        scale = ref.abs().max()
        checks = []
        for i, n in enumerate(lengths.tolist()):
            c = compare(f"batch_encoder_hidden[{i}]", ours[i, :n], ref[i, :n], HIDDEN_TOL)
            c.ref_scale = float(scale)  # tolerance relative to max|ref| over the whole tensor
            checks.append(c)
        return checks

    def mel(k: str):
        return [compare(f"mel{k}", log_mel(io[f"wav{k}"], n_mels=model.config.n_mels), io[f"mel{k}"], MEL_TOL)]

    def wav_to_codes(k: str):
        codes = torch.from_numpy(tokenize_audio(io[f"wav{k}"].numpy(), model))
        return [compare(f"tokenize_audio(wav{k})", codes, io[f"codes{k}"][0])]

    return [_case("codes1", lambda: single("1")), _case("codes2", lambda: single("2")),
            _case("batch_codes", batch), _case("batch_encoder_hidden", hidden),
            _case("mel1", lambda: mel("1")), _case("mel2", lambda: mel("2")),
            _case("wav1->codes1", lambda: wav_to_codes("1")), _case("wav2->codes2", lambda: wav_to_codes("2"))]

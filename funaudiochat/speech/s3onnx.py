"""ONNX side of the S3 tokenizer: run a released `speech_tokenizer_v3.onnx`, export ours, read one into torch.

The released file takes one utterance: `feats` float32 [1, 128, T] and `feats_length` int32 [1], and returns
`indices` (the codes, 25 Hz). `S3TokenizerONNX` runs such a file behind the same `quantize(mel, mel_len)` as the
torch `S3Tokenizer`; `export_onnx` writes our module with the same names and a dynamic T; `load_onnx_tokenizer`
reads the weights of such a graph (released or ours) back into an `S3Tokenizer`; `load_speech_tokenizer` gives
either backend for `tokenize_audio`.
"""
from __future__ import annotations

import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from funaudiochat.errors import CheckpointError, InputError
from funaudiochat.speech.s3tokenizer import FSQ_DIGITS, S3Tokenizer, S3TokenizerConfig, check_mel_batch

INPUT_NAMES = ("feats", "feats_length")
OUTPUT_NAME = "indices"
HEAD_DIM = 64  # not visible in the weights; every released S3 tokenizer uses 64


class S3TokenizerONNX:
    """An onnxruntime session on a speech-tokenizer ONNX file; one utterance per run, as released."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"speech tokenizer ONNX file not found: {path} (CosyVoice3 ships it as "
                                  f"speech_tokenizer_v3.onnx; or write one with export_onnx)")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise CheckpointError(f"{path} is not a loadable ONNX model: {err}") from err
        inputs = self.session.get_inputs()
        if len(inputs) != 2 or len(inputs[0].shape) != 3:
            raise CheckpointError(f"{path}: expected inputs feats [1, n_mels, T] and feats_length [1], got "
                                  f"{[(i.name, i.shape) for i in inputs]}")
        self.input_names = [i.name for i in inputs]
        n_mels = inputs[0].shape[1]
        self.n_mels = n_mels if isinstance(n_mels, int) else 128

    def quantize(self, mel: torch.Tensor, mel_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, M, T], mel_len [B] -> codes [B, T'] int64 (zero past code_len), code_len [B]."""
        mel, mel_len = check_mel_batch(mel, mel_len, self.n_mels)
        rows = []
        for item, n in zip(mel, mel_len.tolist()):
            feats = item[None, :, :n].float().cpu().numpy()
            out = self.session.run(None, {self.input_names[0]: feats,
                                          self.input_names[1]: np.array([n], dtype=np.int32)})[0]
            rows.append(torch.from_numpy(np.asarray(out).reshape(-1).astype(np.int64)))
        code_len = torch.tensor([len(r) for r in rows])
        codes = torch.zeros(len(rows), int(code_len.max()), dtype=torch.long)
        for i, r in enumerate(rows):
            codes[i, : len(r)] = r
        return codes, code_len


class _ExportGraph(nn.Module):
    """(feats [1, M, T], feats_length [1] int32) -> indices [1, T'] int64."""

    def __init__(self, model: S3Tokenizer):
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        return self.model(feats, feats_length.long()).codes


def export_onnx(model: S3Tokenizer, path: str | Path, opset: int = 17) -> Path:
    """Write `model` as an ONNX file with the released input/output names and a dynamic number of frames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = _ExportGraph(model).eval()
    p = next(model.parameters())
    feats = torch.zeros(1, model.config.n_mels, 203, device=p.device, dtype=p.dtype)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer notes
        torch.onnx.export(graph, (feats, torch.tensor([203], dtype=torch.int32)), str(path), dynamo=False,
                          input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], opset_version=opset,
                          dynamic_axes={INPUT_NAMES[0]: {2: "T"}, OUTPUT_NAME: {1: "T_out"}})
    return path


# ---- ONNX graph -> state dict ------------------------------------------------------------------------------------

# A node's scope inside block N, as released ("/blocks.0/attn/query/MatMul") or as we export
# ("/model/encoder/blocks.0/mlp/mlp.0/MatMul"): the part after "blocks.N/" names the module.
_BLOCK_SCOPE = re.compile(r"blocks\.(\d+)/(attn/(?:query|key|value|out)|attn_ln|mlp_ln|mlp/(?:mlp\.)?[02])/")
_BLOCK_INDEX = re.compile(r"blocks\.(\d+)[./]")


def state_dict_from_onnx(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Weights of an S3 tokenizer ONNX graph under our state-dict names, plus LayerNorm epsilons by module.

    Mapping by graph structure, not by initializer names (the released file calls them `onnx::Conv_3986` and
    the like): MatMul weights are transposed back to Linear layout; the Add fed by a MatMul holds its bias."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as err:
        raise CheckpointError(f"cannot read ONNX file {path}: {err}") from err
    init = {t.name: t for t in graph.initializer}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    state: dict[str, np.ndarray] = {}
    eps: dict[str, float] = {}
    stem_convs = []

    def weights(node) -> list[np.ndarray]:
        return [numpy_helper.to_array(init[n]) for n in node.input if n in init]

    def linear(node, prefix: str) -> None:
        matrices = [a for a in weights(node) if a.ndim == 2]
        if len(matrices) != 1:
            raise CheckpointError(f"{path}: node {node.name} ({prefix}) has no stored weight matrix; "
                                  f"this graph layout is not supported")
        w = matrices[0]
        state[f"{prefix}.weight"] = w.T
        for add in consumers[node.output[0]]:
            biases = [a for a in weights(add) if add.op_type == "Add" and a.ndim == 1 and a.shape[0] == w.shape[1]]
            if biases:
                state[f"{prefix}.bias"] = biases[0]

    for node in graph.node:
        scope = _BLOCK_SCOPE.search(node.name)
        if node.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in node.attribute):  # FSMN, depthwise
            block = _BLOCK_INDEX.search(" ".join([node.name, *node.input]))
            if block is None:
                raise CheckpointError(f"{path}: depthwise conv {node.name} belongs to no block")
            state[f"encoder.blocks.{block.group(1)}.attn.fsmn_block.weight"] = weights(node)[0]
        elif scope:
            module = scope.group(2).replace("/", ".").replace("mlp.mlp.", "mlp.")
            prefix = f"encoder.blocks.{scope.group(1)}.{module}"
            if node.op_type == "MatMul" and not module.endswith("_ln"):
                linear(node, prefix)
            elif node.op_type == "LayerNormalization":
                scale, bias = node.input[1:3]
                state[f"{prefix}.weight"] = numpy_helper.to_array(init[scale])
                state[f"{prefix}.bias"] = numpy_helper.to_array(init[bias])
                eps[prefix] = next((float(f"{a.f:.7g}") for a in node.attribute if a.name == "epsilon"), 1e-5)
        elif node.op_type == "Conv":
            stem_convs.append(weights(node))
        elif node.op_type == "MatMul" and any(a.ndim == 2 and a.shape[1] == FSQ_DIGITS for a in weights(node)):
            linear(node, "quantizer._codebook.project_down")
    if len(stem_convs) != 2 or any(len(w) != 2 for w in stem_convs):
        raise CheckpointError(f"{path}: expected 2 stem convolutions with weight and bias outside the blocks, "
                              f"found {len(stem_convs)}; is this an S3 speech tokenizer?")
    for i, (w, b) in enumerate(stem_convs, start=1):
        state[f"encoder.conv{i}.weight"], state[f"encoder.conv{i}.bias"] = w, b
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}, eps


def load_onnx_tokenizer(path: str | Path) -> S3Tokenizer:
    """Build an `S3Tokenizer` whose sizes are read from an ONNX graph, and load its weights strictly."""
    state, eps = state_dict_from_onnx(path)
    n_state, n_mels, _ = state["encoder.conv1.weight"].shape
    n_layer = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks.")), default=-1)
    fsmn = state.get("encoder.blocks.0.attn.fsmn_block.weight")
    config = S3TokenizerConfig(
        n_mels=n_mels, n_audio_state=n_state, n_audio_head=max(1, n_state // HEAD_DIM), n_audio_layer=n_layer,
        fsmn_kernel=fsmn.shape[-1] if fsmn is not None else 31,
        attn_ln_eps=eps.get("encoder.blocks.0.attn_ln", 1e-5), mlp_ln_eps=eps.get("encoder.blocks.0.mlp_ln", 1e-5))
    model = S3Tokenizer(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors, all listed
        raise CheckpointError(f"{path}: the ONNX graph does not fit an S3 tokenizer: {err}") from err
    return model.eval()


def load_speech_tokenizer(path: str | Path, backend: str = "onnx", threads: int | None = None):
    """A tokenizer backend for `tokenize_audio` from a speech-tokenizer ONNX file (e.g. `speech_tokenizer_v3.onnx`).

    backend "onnx": onnxruntime on the file, one utterance at a time (as released).
    backend "torch": its weights in our `S3Tokenizer` (batched; runs wherever torch runs)."""
    if backend == "onnx":
        return S3TokenizerONNX(path, threads=threads)
    if backend == "torch":
        return load_onnx_tokenizer(path)
    raise InputError(f"unknown speech tokenizer backend {backend!r}; use 'onnx' or 'torch'")

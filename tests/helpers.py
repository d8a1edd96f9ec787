"""Test helpers shared by several test files: a tiny tokenizer with the golden token layout, wav writing, synthetic
training records, a tiny CosyVoice3 detokenizer folder.

The tiny tokenizer is a word-level vocabulary whose ids match `funaudiochat.model.presets.tiny()` and the goldens:
"\\n" 13, "system" 20, "user" 21, "assistant" 22, words "w30" .. "w499" at ids 30 .. 499 (`words([42, 7])` writes
ids as text), `<|endoftext|>` 500, `<|im_start|>` 501, `<|im_end|>` 502, `<|audio_bos|>` 503, `<|audio_eos|>` 504,
`<|AUDIO|>` 505, `<|sil|>` 506, `<|audio_pad|>` 507; any other word is `[UNK]` (0). Spaces separate words.
"""
from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np

from funaudiochat.text.tokenizer import TextTokenizer

SPECIALS = {500: "<|endoftext|>", 501: "<|im_start|>", 502: "<|im_end|>", 503: "<|audio_bos|>",
            504: "<|audio_eos|>", 505: "<|AUDIO|>", 506: "<|sil|>", 507: "<|audio_pad|>"}
NAMED = {0: "[UNK]", 13: "\n", 20: "system", 21: "user", 22: "assistant"}


def tiny_vocab() -> dict[str, int]:
    vocab = {}
    for i in range(508):
        vocab[SPECIALS.get(i) or NAMED.get(i) or (f"w{i}" if i >= 30 else f"<unused{i}>")] = i
    return vocab


def make_tiny_tokenizer(path) -> TextTokenizer:
    """Write a tokenizer.json with the tiny layout to `path` (a file or a folder) and load it."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    path = Path(path)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.WordLevel(tiny_vocab(), unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" "), "removed"),
                                                pre_tokenizers.Split(Regex("\n"), "isolated")])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS.values()])
    tk.save(str(path))
    return TextTokenizer.from_file(path)


def make_word_tokenizer(path, text: str) -> TextTokenizer:
    """The tiny layout, with the words and punctuation marks of `text` (in order of appearance) at ids 30, 31, ...
    in place of "w30", "w31", ...: English sentences then encode to real ids instead of `[UNK]`. Words split at
    spaces, new lines and punctuation. Writes `path` (a tokenizer.json or its folder) and loads it."""
    import re

    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    vocab = tiny_vocab()
    free = iter(range(30, 500))
    for word in dict.fromkeys(re.findall(r"\w+|[^\w\s]", text)):
        if word not in vocab:
            i = next(free, None)
            if i is None:
                break
            del vocab[f"w{i}"]
            vocab[word] = i
    path = Path(path)
    if path.suffix != ".json":
        path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" "), "removed"),
                                                pre_tokenizers.Split(Regex("\n"), "isolated"),
                                                pre_tokenizers.Split(Regex(r"[^\w\s]"), "isolated")])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS.values()])
    tk.save(str(path))
    return TextTokenizer.from_file(path)


def make_tiny_checkpoint(folder, vocabulary_text: str = "", seed: int = 0, init_std: float = 0.02,
                         codebook: int = 300) -> Path:
    """A random tiny-preset model saved as a checkpoint folder (config.json, safetensors, tokenizer.json), with a
    word-level tokenizer that knows the words of `vocabulary_text` (make_word_tokenizer)."""
    import torch

    from funaudiochat.model.checkpoint import save_model
    from funaudiochat.model.funaudiochat import FunAudioChatModel
    from funaudiochat.model.presets import tiny

    folder = Path(folder)
    torch.manual_seed(seed)
    model = FunAudioChatModel(tiny(codebook=codebook))
    model.init_weights(init_std)
    save_model(model, folder)
    make_word_tokenizer(folder, vocabulary_text)
    return folder


def run_in_thread(fn):
    """fn() on a new thread (torch keeps thread counts per thread), its result returned."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def words(ids) -> str:
    """Ordinary tiny-vocabulary ids (30..499) -> the text that encodes to them."""
    return " ".join(f"w{int(i)}" for i in ids)


def noise_audio(seconds: float, seed: int) -> np.ndarray:
    """`seconds` of 16 kHz float32 Gaussian noise (std 0.1): a clip for a model's ear, seeded."""
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def write_wav(path, seconds: float, seed: int = 0, sample_rate: int = 16000, freq: float | None = None) -> Path:
    """A mono 16-bit wav of `seconds`: a tone at `freq` Hz plus a little noise (pure noise without `freq`)."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    wav = 0.05 * rng.standard_normal(n)
    if freq:
        wav += 0.5 * np.sin(2 * np.pi * freq * np.arange(n) / sample_rate)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(wav, -1, 1).astype(np.float32), sample_rate, subtype="PCM_16")
    return path


def sharegpt_record(system: str, user_wav, answer_ids, codes, user_seconds: float, extra_user_text: str = "") -> dict:
    """One released-format S2S training record (SPEC §8.1): user audio in, assistant text + speech out."""
    import json

    from funaudiochat.text.tokenizer import AUDIO_TEMPLATE
    from funaudiochat.train.data import assistant_token_string

    def entry(**kw):
        return json.dumps({"path": "", "text": "", "token": "", "ref_path": "", "ref_text": "", **kw},
                          ensure_ascii=False, sort_keys=True)

    user_content = AUDIO_TEMPLATE + (f"\n{extra_user_text}" if extra_user_text else "")
    return {"system": system,
            "messages": [{"role": "user", "content": user_content}, {"role": "assistant", "content": AUDIO_TEMPLATE}],
            "audio": [entry(path=str(user_wav), token="<|audio_pad|>" * int(user_seconds * 25)),
                      entry(text=words(answer_ids), token=assistant_token_string(codes))]}


def synthetic_s2s(folder, n: int = 8, seed: int = 0) -> Path:
    """A made-up speech-to-speech task: a tone (one frequency per item) in, a fixed answer out; the answer's speech
    codes are a deterministic function of its words. Writes wavs and `train.jsonl` into `folder`."""
    import json

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        seconds = float(rng.choice([0.4, 0.6, 0.8]))
        wav = write_wav(folder / f"q{i}.wav", seconds, seed=seed * 1000 + i, freq=200.0 + 60 * i)
        answer = [int(x) for x in rng.integers(30, 500, size=int(rng.integers(3, 7)))]
        codes = [c for w in answer for c in ((w * 7) % 290, (w * 13) % 290, (w * 29) % 290)]
        lines.append(json.dumps(sharegpt_record(words([40, 41, 42]), wav, answer, codes, seconds)))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_recipe(tmp, data_path, stage: str = "sft", **sections) -> dict:
    """A recipe dict for the tiny preset model (random init) on `data_path`; `sections` update sections' keys."""
    tok = Path(tmp) / "tok" / "tokenizer.json"
    if not tok.exists():
        make_tiny_tokenizer(tok)
    recipe = {"stage": stage, "run_dir": str(Path(tmp) / "run"),
              "model": {"preset": "tiny", "tokenizer": str(tok)},
              "data": {"train": [str(data_path)], "max_len": 256, "packing": stage == "sft"},
              "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "grad_clip": 1.0},
              "train": {"steps": 5, "global_batch": 4, "micro_batch": 2, "seed": 0},
              "log": {"progress": False, "tensorboard": False}}
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    return recipe


def synthetic_pairs(folder, n: int = 8, seed: int = 0) -> Path:
    """Made-up DPO pairs, tagged round-robin with the four paper tasks: the synthetic S2S answer (text + speech) is
    chosen, a shuffled answer with other speech codes is rejected. Writes wavs and `pairs.jsonl`."""
    import json

    from funaudiochat.text.tokenizer import AUDIO_TEMPLATE
    from funaudiochat.train.config import DPO_TASKS
    from funaudiochat.train.data import assistant_token_string

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        seconds = float(rng.choice([0.4, 0.6]))
        wav = write_wav(folder / f"p{i}.wav", seconds, seed=seed * 1000 + i, freq=300.0 + 50 * i)
        answer = [int(x) for x in rng.integers(30, 500, size=4)]
        codes = [c for w in answer for c in ((w * 7) % 290, (w * 13) % 290)]
        worse = [int(x) for x in rng.integers(30, 500, size=4)]
        user = json.dumps({"path": str(wav), "text": "", "token": "<|audio_pad|>" * int(seconds * 25)})
        lines.append(json.dumps({
            "task": DPO_TASKS[i % len(DPO_TASKS)], "system": words([40, 41]),
            "messages": [{"role": "user", "content": AUDIO_TEMPLATE}], "audio": [user],
            "chosen": {"text": words(answer), "token": assistant_token_string(codes)},
            "rejected": {"text": words(worse), "token": assistant_token_string(list(rng.integers(0, 290, 8)))}}))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- a tiny CosyVoice3 detokenizer folder
TINY_COSYVOICE_YAML = """
__set_seed1: !apply:random.seed [1986]
chunk_size: 15
token_mel_ratio: 2
flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        channels: 32
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: 64
            depth: 2
            heads: 4
            dim_head: 16
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    base_channels: 16
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        cond_channels: 16
"""


def tiny_detokenizer_modules(seed=0):
    """Random tiny flow + HiFT with the released noise recipe; f0 near the voicing threshold."""
    import torch

    from funaudiochat.speech.cosyvoice_config import tiny
    from funaudiochat.speech.flow import TokenToMelFlow
    from funaudiochat.speech.vocoder import HiFTVocoder, released_source_rng

    cfg = tiny()
    torch.manual_seed(seed)
    flow = TokenToMelFlow(cfg.flow).eval()
    hift = HiFTVocoder(cfg.hift, rng=released_source_rng(cfg)).eval()
    with torch.no_grad():
        hift.f0_predictor.classifier.weight.mul_(150)
        hift.f0_predictor.classifier.bias.fill_(12)
    return flow, hift


def write_tiny_detokenizer(path) -> Path:
    """flow.pt, hift.pt, spk2info.pt and cosyvoice3.yaml of tiny random modules, in the released formats."""
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flow, hift = tiny_detokenizer_modules()
    torch.save(flow.state_dict(), path / "flow.pt")
    torch.save(hift.state_dict(), path / "hift.pt")
    g = torch.Generator().manual_seed(5)
    torch.save({"中文女": {"embedding": torch.randn(1, 192, generator=g), "speech_token": torch.zeros(1, 5).long(),
                           "speech_feat": torch.zeros(1, 8, 80)},
                "中文男": {"embedding": torch.randn(1, 192, generator=g)}}, path / "spk2info.pt")
    (path / "cosyvoice3.yaml").write_text(TINY_COSYVOICE_YAML)
    return path


def write_campplus_stub(folder: Path) -> np.ndarray:
    """A stand-in campplus.onnx speaker model in FOLDER: mean over time of |fbank| @ W; returns W [80, 192]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((80, 192)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Abs", ["feats"], ["a"]), helper.make_node("ReduceMean", ["a"], ["m"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["embedding"])], "campplus_stub",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, None, 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 192])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), Path(folder) / "campplus.onnx")
    return w


class JsonEndpoint:
    """A real HTTP server on 127.0.0.1 (a free port) that answers every POST with `reply(path, body)` ->
    (status, JSON object); `url` ends in /v1, as an OpenAI-compatible base URL does. Use it as a context manager."""

    def __init__(self, reply):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, answer = reply(self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def error_line(run: subprocess.CompletedProcess, prefix: str, code: int = 1) -> str:
    """The run failed (exit `code`) with exactly one `PREFIX: error: ...` line on stderr; returns that line."""
    assert run.returncode == code, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith(f"{prefix}: error: ")]
    assert len(lines) == 1, run.stderr
    return lines[0]


def fill(disk: Path, leave: int) -> None:
    """Fill a small disk until only about `leave` bytes are free."""
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))

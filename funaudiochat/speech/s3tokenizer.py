"""S3 speech tokenizer (CosyVoice3 `speech_tokenizer_v3`): 16 kHz audio -> 25 Hz codes in [0, 6561).

Shapes: B batch, M mel bins (128), T mel frames (100 Hz), T' code frames (25 Hz), C state, H heads, D head dim (64).

    log-mel [B, M, T] -> conv1 (stride 2) -> GELU -> conv2 (stride 2) -> GELU -> [B, T', C]
      -> blocks: x += attn(LN(x)) + FSMN(V);  x += MLP(LN(x))    (RoPE on q, k; padded keys masked)
      -> FSQ: tanh(Linear C->8) * 0.999, round to {-1, 0, 1}, code = sum_i (digit_i + 1) * 3^i

Parameter names follow the public S3Tokenizer state dict (`encoder.blocks.N.attn.query.weight`, ...,
`quantizer._codebook.project_down.weight`), so its `.pt` files load with `strict=True`.
The front (`segment_bounds`, `tokenize_audio`, `tokenize_batch`) reproduces the segmenting of the released
training-data pipeline (SPEC §9.1) and works with any backend that has `quantize(mel, mel_len)`: the torch
`S3Tokenizer` here or `S3TokenizerONNX` in s3onnx.py.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from funaudiochat.audio.mel import HOP, SAMPLE_RATE, log_mel
from funaudiochat.errors import ConfigError, InputError

FSQ_DIGITS = 8              # project_down width; each digit has 3 levels
CODEBOOK_SIZE = 3 ** FSQ_DIGITS
FSQ_SCALE = 0.999           # tanh(x) * 0.999 before rounding, as released
SEGMENT_SECONDS = 30
MIN_TAIL_SECONDS = 1


@dataclass
class S3TokenizerConfig:
    """Sizes of the S3 tokenizer. Defaults are the released v3 (CosyVoice3 `speech_tokenizer_v3.onnx`)."""

    n_mels: int = 128
    n_audio_state: int = 1280
    n_audio_head: int = 20      # head dim = n_audio_state / n_audio_head (64 in every released model)
    n_audio_layer: int = 12     # v2: 6
    fsmn_kernel: int = 31
    attn_ln_eps: float = 1e-5   # the v2 snapshot at S3Tokenizer@2abe1c5 used 1e-6 here
    mlp_ln_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.n_audio_state % self.n_audio_head or (self.n_audio_state // self.n_audio_head) % 2:
            raise ConfigError(f"n_audio_state={self.n_audio_state} must be n_audio_head={self.n_audio_head} "
                              f"times an even head dim (64 in the released models)")
        if self.fsmn_kernel < 1:
            raise ConfigError(f"fsmn_kernel must be >= 1, got {self.fsmn_kernel}")

    @classmethod
    def from_dict(cls, d: dict) -> "S3TokenizerConfig":
        """Read the keys we know from a config dict (e.g. a golden `config.json`); other keys are ignored."""
        if d.get("n_codebook_size", CODEBOOK_SIZE) != CODEBOOK_SIZE:
            raise ConfigError(f"n_codebook_size={d['n_codebook_size']}: "
                              f"only the FSQ 3^8 = {CODEBOOK_SIZE} codebook exists")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def _halved(n):
    """Output frames of a k3, stride 2, pad 1 convolution over n frames: ceil(n / 2)."""
    return (n - 1) // 2 + 1


def code_lengths(mel_len):
    """Code frames (25 Hz) for `mel_len` mel frames (100 Hz); int or tensor."""
    return _halved(_halved(mel_len))


def _length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """[B] lengths -> [B, size] bool, True on valid frames."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [B, T', H, D]; cos, sin [T', D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class FSMNAttention(nn.Module):
    """Multi-head self-attention with RoPE, plus an FSMN memory (depthwise conv over time) on V."""

    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        c = cfg.n_audio_state
        self.n_head = cfg.n_audio_head
        self.query = nn.Linear(c, c)
        self.key = nn.Linear(c, c, bias=False)
        self.value = nn.Linear(c, c)
        self.out = nn.Linear(c, c)
        self.fsmn_block = nn.Conv1d(c, c, cfg.fsmn_kernel, groups=c, bias=False)
        left = (cfg.fsmn_kernel - 1) // 2
        self.fsmn_padding = (left, cfg.fsmn_kernel - 1 - left)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T', C]; valid [B, T'] bool."""
        b, t, c = x.shape
        q = self.query(x).view(b, t, self.n_head, -1)          # [B, T', H, D]
        k = self.key(x).view(b, t, self.n_head, -1)
        v = self.value(x)                                      # [B, T', C]
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)

        keep = valid[:, :, None].to(x.dtype)                   # [B, T', 1]
        v_masked = v * keep
        memory = self.fsmn_block(F.pad(v_masked.transpose(1, 2), self.fsmn_padding)).transpose(1, 2)
        memory = (memory + v_masked) * keep                    # [B, T', C]

        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, self.n_head, -1).transpose(1, 2),
            attn_mask=valid[:, None, None, :])                 # [B, H, T', D]; padded keys masked
        return self.out(attn.transpose(1, 2).reshape(b, t, c)) + memory


class ResidualBlock(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        c = cfg.n_audio_state
        self.attn = FSMNAttention(cfg)
        self.attn_ln = nn.LayerNorm(c, eps=cfg.attn_ln_eps)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.mlp_ln = nn.LayerNorm(c, eps=cfg.mlp_ln_eps)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), valid, cos, sin)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: S3TokenizerConfig):
        super().__init__()
        c = cfg.n_audio_state
        self.conv1 = nn.Conv1d(cfg.n_mels, c, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(c, c, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(cfg) for _ in range(cfg.n_audio_layer))
        head_dim = c // cfg.n_audio_head
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, mel: torch.Tensor, mel_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, M, T], mel_len [B] -> hidden [B, T', C], hidden_len [B]. Padded frames never reach valid ones."""
        x = mel * _length_mask(mel_len, mel.shape[-1])[:, None, :]
        x = F.gelu(self.conv1(x))
        half_len = _halved(mel_len)
        x = F.gelu(self.conv2(x * _length_mask(half_len, x.shape[-1])[:, None, :]))
        hidden_len = _halved(half_len)
        x = x.transpose(1, 2)                                  # [B, T', C]
        valid = _length_mask(hidden_len, x.shape[1])          # [B, T']

        angles = torch.outer(torch.arange(x.shape[1], device=x.device, dtype=torch.float32), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)           # [T', D]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, valid, cos, sin)
        return x, hidden_len


class FSQuantizer(nn.Module):
    """Finite scalar quantizer: 8 digits with 3 levels each. The up-projection (decoder) was never released."""

    def __init__(self, dim: int):
        super().__init__()
        self._codebook = nn.ModuleDict({"project_down": nn.Linear(dim, FSQ_DIGITS)})  # name kept for the checkpoint
        self.register_buffer("powers", 3 ** torch.arange(FSQ_DIGITS), persistent=False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T', C] -> digits [B, T', 8] in {-1, 0, 1}, codes [B, T'].

        In training mode the digits carry a straight-through gradient (that of the unrounded tanh)."""
        z = torch.tanh(self._codebook["project_down"](hidden).float()) * FSQ_SCALE
        digits = torch.round(z)
        if self.training:
            digits = z + (digits - z).detach()
        codes = ((digits.detach() + 1).long() * self.powers).sum(-1)
        return digits, codes


class S3Output(NamedTuple):
    hidden: torch.Tensor    # [B, T', C] encoder output before FSQ
    digits: torch.Tensor    # [B, T', 8] FSQ digits in {-1, 0, 1}; straight-through gradient in training mode
    codes: torch.Tensor     # [B, T'] int64 in [0, 6561); positions >= lengths are padding
    lengths: torch.Tensor   # [B] valid code frames


class S3Tokenizer(nn.Module):
    """The S3 v2/v3 tokenizer in PyTorch. Batched with lengths; trainable (FSQ straight-through)."""

    def __init__(self, config: S3TokenizerConfig | None = None):
        super().__init__()
        self.config = config or S3TokenizerConfig()
        self.encoder = AudioEncoder(self.config)
        self.quantizer = FSQuantizer(self.config.n_audio_state)

    @property
    def n_mels(self) -> int:
        return self.config.n_mels

    def encode(self, mel: torch.Tensor, mel_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, M, T], mel_len [B] -> hidden [B, T', C], hidden_len [B]."""
        return self.encoder(mel, mel_len)

    def fsq_codes(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T', C] -> codes [B, T'] int64."""
        return self.quantizer(hidden)[1]

    def forward(self, mel: torch.Tensor, mel_len: torch.Tensor) -> S3Output:
        hidden, lengths = self.encode(mel, mel_len)
        digits, codes = self.quantizer(hidden)
        return S3Output(hidden, digits, codes, lengths)

    @torch.no_grad()
    def quantize(self, mel: torch.Tensor, mel_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, M, T] float, mel_len [B] -> codes [B, T'] int64, code_len [B]. Codes past code_len are padding."""
        mel, mel_len = check_mel_batch(mel, mel_len, self.config.n_mels)
        p = next(self.parameters())
        hidden, code_len = self.encode(mel.to(p.device, p.dtype), mel_len.to(p.device))
        return self.fsq_codes(hidden), code_len


def check_mel_batch(mel, mel_len, n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert a mel batch for `quantize`; raises InputError naming the problem."""
    mel, mel_len = torch.as_tensor(mel), torch.as_tensor(mel_len)
    if mel.dim() != 3 or mel.shape[1] != n_mels:
        raise InputError(f"mel must be [B, {n_mels}, T] (a {n_mels}-bin Whisper log-mel), "
                         f"got shape {tuple(mel.shape)}")
    if not mel.is_floating_point():
        raise InputError(f"mel must be a float tensor, got {mel.dtype}")
    if mel_len.shape != (mel.shape[0],) or mel_len.is_floating_point():
        raise InputError(f"mel_len must be integer lengths of shape [{mel.shape[0]}], "
                         f"got {mel_len.dtype} {tuple(mel_len.shape)}")
    if mel.shape[0] == 0 or int(mel_len.min()) < 1 or int(mel_len.max()) > mel.shape[2]:
        raise InputError(f"mel_len must be in [1, {mel.shape[2]}] for every item, got {mel_len.tolist()}")
    if not torch.isfinite(mel).all():
        raise InputError("mel contains NaN or infinite values")
    return mel, mel_len.long()


# ---- front: waveform -> segments -> log-mel -> codes -------------------------------------------------------------

class Quantizer(Protocol):
    """A tokenizer backend: the torch `S3Tokenizer` or `S3TokenizerONNX`."""

    n_mels: int

    def quantize(self, mel: torch.Tensor, mel_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def segment_bounds(n_samples: int, sr: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """[(start, end)] sample ranges: 30 s segments; when there are several and the last is shorter than 1 s,
    the last two are merged and split at half (the released training-data pipeline, SPEC §9.1)."""
    if n_samples <= 0:
        raise InputError("the audio is empty")
    step = SEGMENT_SECONDS * sr
    bounds = [(s, min(s + step, n_samples)) for s in range(0, n_samples, step)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_TAIL_SECONDS * sr:
        start, end = bounds[-2][0], bounds[-1][1]
        mid = start + (end - start) // 2
        bounds[-2:] = [(start, mid), (mid, end)]
    return bounds


def _segment_mels(wav_16k: np.ndarray, n_mels: int) -> list[torch.Tensor]:
    """One [M, T] log-mel per segment, each computed on its own like the released pipeline."""
    wav = np.asarray(wav_16k)
    if wav.ndim != 1:
        raise InputError(f"expected mono 16 kHz audio of shape [samples], got shape {wav.shape}")
    if not np.issubdtype(wav.dtype, np.floating):
        raise InputError(f"expected float audio samples in [-1, 1], got dtype {wav.dtype}")
    if not np.isfinite(wav).all():
        raise InputError("the audio contains NaN or infinite samples")
    return [log_mel(torch.from_numpy(np.ascontiguousarray(wav[start:end], dtype=np.float32)), n_mels)
            for start, end in segment_bounds(len(wav))]


def _pad_mels(mels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, T_i] list -> mel [N, M, max T], mel_len [N]."""
    lengths = torch.tensor([m.shape[-1] for m in mels])
    batch = mels[0].new_zeros(len(mels), mels[0].shape[0], int(lengths.max()))
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[-1]] = m
    return batch, lengths


def tokenize_batch(wavs: Sequence[np.ndarray], backend: Quantizer, max_segments: int = 16) -> list[np.ndarray]:
    """Mono 16 kHz float waves -> one int64 code array (25 Hz) per wave.

    The segments of all waves go through `backend.quantize` in padded batches of at most `max_segments`,
    sorted by length so that little padding is computed."""
    per_wave = [_segment_mels(w, backend.n_mels) for w in wavs]
    flat = [m for mels in per_wave for m in mels]
    order = sorted(range(len(flat)), key=lambda i: flat[i].shape[-1])
    codes: list[np.ndarray] = [np.empty(0, np.int64)] * len(flat)
    for start in range(0, len(order), max_segments):
        chunk = order[start: start + max_segments]
        out, out_len = backend.quantize(*_pad_mels([flat[i] for i in chunk]))
        for row, i in enumerate(chunk):
            codes[i] = out[row, : int(out_len[row])].cpu().numpy().astype(np.int64)
    result, k = [], 0
    for mels in per_wave:
        result.append(np.concatenate(codes[k: k + len(mels)]))
        k += len(mels)
    return result


def tokenize_audio(wav_16k: np.ndarray, backend: Quantizer) -> np.ndarray:
    """One mono 16 kHz float wave -> int64 codes [N] at 25 Hz, in [0, 6561)."""
    return tokenize_batch([wav_16k], backend)[0]


def expected_code_count(n_samples: int, sr: int = SAMPLE_RATE) -> int:
    """How many codes `tokenize_audio` gives for `n_samples` samples (whisper drops the last STFT frame)."""
    return sum(code_lengths((end - start) // HOP) for start, end in segment_bounds(n_samples, sr))

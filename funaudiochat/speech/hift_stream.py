"""Incremental HiFT for streaming: each chunk vocodes only its new mel frames, several streams batched.

The released streaming loop (and `HiFTVocoder.forward_rows`) re-runs HiFT on the whole accumulated mel for every
chunk and keeps the samples past the previous output, so a chunk's cost grows with the answer. Every HiFT layer is
causal (at most a fixed look-ahead), so the same samples come from continuing each layer where it stopped. A stream
keeps, between chunks (`HiFTStream`):
- each convolution's last input frames, its left context (zeros before the first chunk, as its padding), and the
  mel frames the F0 predictor's first conv (3) and conv_pre (4) look ahead over;
- the source's running phase sum, in float64 as `torch.cumsum` accumulates it, and its place in the fixed noise;
- the source samples the next STFT frames overlap (the STFT is centred: 8 samples each side);
- the iSTFT overlap-add's partial sums (12 samples), and the samples made but held back: a non-final whole-mel call
  drops its last 480 samples, so each chunk releases exactly the samples the whole-mel re-run would.
The result equals the whole-mel re-run up to float rounding (convolution blocking, FFT and overlap-add sum order):
tests/test_hift_stream.py. The same operations run in the same order on the same values otherwise: the noise is the
same fixed noise at the same positions, the phase the same float64 sum.

Rows of a batch are right-padded; every row's valid frames are tracked per layer (`lengths`), and a layer's
context is cut from each row's own valid end, so rows at different points of their streams (a first chunk has 7
frames fewer past conv_pre, 1 sample more at the last rate: the reflect pad) share calls.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from funaudiochat.speech.vocoder import CausalDownsample, HiFTVocoder, ResBlock


@dataclass
class HiFTStream:
    """One stream's vocoder state between chunks."""

    frames: int = 0  # mel frames vocoded so far
    held: torch.Tensor | None = None  # [1, M, n] mel waiting for the first call (which needs more than 8 frames)
    context: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> its input's last frames [C, n]
    phase: torch.Tensor | None = None  # [H] float64 running sum of the per-frame phase increments (cycles)
    noise_at: int = 0  # source samples made: the position in the fixed noise
    stft_at: int = 0  # source STFT frames made
    source: torch.Tensor | None = None  # [n] source samples from 4 * stft_at - 8 (what the next frames overlap)
    ola: torch.Tensor | None = None  # [2, 12] the iSTFT's partial sums: signal, window envelope
    out: torch.Tensor | None = None  # [n] samples made, not yet released
    released: int = 0  # samples released

    def copy(self) -> "HiFTStream":
        """A copy a round can move on (tensors are replaced, never written in place): a failed round leaves the
        stream as it was."""
        new = copy.copy(self)
        new.context = dict(self.context)
        return new


MIN_FIRST_FRAMES = 9  # a non-final call makes samples only past the 8 frames it holds back


def _pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """[..., T_b] tensors -> [B, ..., max T], right-padded with zeros."""
    width = max(r.shape[-1] for r in rows)
    return torch.stack([F.pad(r, (0, width - r.shape[-1])) for r in rows])


def _extend(x: torch.Tensor, lengths: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    """Append n zero frames at each row's valid end (a finalising call's zero look-ahead)."""
    x = F.pad(x, (0, n))  # (a new tensor: the caller's x is not written)
    for b, length in enumerate(lengths):
        x[b, ..., length:length + n] = 0
    return x, [length + n for length in lengths]


class _Rows:
    """One batched step over the streams `states` (copies, moved as the layers run)."""

    def __init__(self, hift: HiFTVocoder, states: list[HiFTStream]):
        self.hift, self.states = hift, states

    def conv(self, name: str, conv: nn.Conv1d, x: torch.Tensor, lengths: list[int], start_pad: int):
        """Continue `conv` (no padding of its own) on the rows' new frames: each row's input is its context (zeros
        of `start_pad` frames before its first chunk) + its valid frames. -> output, its valid lengths, the input."""
        k_eff = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
        stride = conv.stride[0]
        keep = k_eff - stride
        contexts = [st.context.get(name) for st in self.states]
        contexts = [c if c is not None else x.new_zeros(x.shape[1], start_pad) for c in contexts]
        widths = [c.shape[1] for c in contexts]
        if len(set(widths)) == 1:
            inp = torch.cat([torch.stack(contexts), x], dim=2)
        else:
            inp = _pad_rows([torch.cat([c, x[b, :, :n]], dim=1) for b, (c, n) in enumerate(zip(contexts, lengths))])
        in_lengths = [w + n for w, n in zip(widths, lengths)]
        if len(set(in_lengths)) == 1:  # (the usual case: one slice for all rows)
            n = in_lengths[0]
            for st, row in zip(self.states, inp[:, :, n - keep:n].clone()):
                st.context[name] = row
        else:
            for st, row, n in zip(self.states, inp, in_lengths):
                st.context[name] = row[:, n - keep:n].clone()
        out = F.conv1d(inp, conv.weight, conv.bias, stride=stride, dilation=conv.dilation)
        return out, [(n - k_eff) // stride + 1 for n in in_lengths], inp

    def resblock(self, name: str, block: ResBlock, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        for j, (conv1, conv2, act1, act2) in enumerate(zip(block.convs1, block.convs2, block.activations1,
                                                            block.activations2)):
            h = self.conv(f"{name}.{j}.a", conv1, act1(x), lengths, conv1.pad)[0]
            x = self.conv(f"{name}.{j}.b", conv2, act2(h), lengths, conv2.pad)[0] + x
        return x

    def f0(self, mel: torch.Tensor, lengths: list[int], finalize: bool):
        """F0 predictor on the new mel frames -> f0 [B, T] (Hz), its lengths, and the mel frames it consumed (what
        conv_pre continues on: the F0 look-ahead frames stay behind for the next chunk)."""
        f0p = self.hift.f0_predictor
        device = f0p.classifier.weight.device  # the released code runs it on the CPU, in fp32
        x = mel.to(device, torch.float32)
        n_in = lengths
        if finalize:
            x, n_in = _extend(x, lengths, f0p.lookahead)
        h, out_lengths, inp = self.conv("f0.0", f0p.condnet[0], x, n_in, 0)
        for i, layer in enumerate(f0p.condnet[1:], start=1):
            if isinstance(layer, nn.Conv1d):
                h = self.conv(f"f0.{i}", layer, h, out_lengths, layer.pad)[0]
            else:
                h = layer(h)
        f0 = f0p.classifier(h.transpose(1, 2)).squeeze(-1).abs()
        consumed = inp[:, :, :max(out_lengths)].to(mel)
        return f0.to(mel), out_lengths, consumed

    def source(self, f0: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """`SourceModule.sine_waves` + merge, continued: f0 [B, T] frames -> source [B, 480 T]."""
        m = self.hift.m_source
        cfg, scale = m.cfg, m.upsample_scale
        f0_up = f0.repeat_interleave(scale, dim=1).unsqueeze(-1)  # [B, L, 1]
        harmonics = torch.arange(1, cfg.nb_harmonics + 2, device=f0.device, dtype=f0.dtype).view(1, 1, -1)
        rad = (f0_up * harmonics / cfg.sampling_rate) % 1
        for b, st in enumerate(self.states):
            if st.phase is None:  # the stream's first sample
                rad[b, 0, :] = rad[b, 0, :] + m.rand_ini[0]
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / scale, mode="linear").transpose(1, 2)
        carry = torch.stack([st.phase if st.phase is not None else rad.new_zeros(rad.shape[2], dtype=torch.float64)
                             for st in self.states])
        total = torch.cumsum(torch.cat([carry[:, None], rad.double()], dim=1), dim=1)  # as cumsum sums: float64
        for b, (st, n) in enumerate(zip(self.states, lengths)):
            st.phase = total[b, n].clone()
        phase = total[:, 1:].to(rad.dtype) * 2 * np.pi
        phase = F.interpolate(phase.transpose(1, 2) * scale, scale_factor=scale, mode="nearest").transpose(1, 2)
        sines = torch.sin(phase) * cfg.nsf_alpha
        uv = (f0_up > cfg.nsf_voiced_threshold).float()
        noise_amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        rows = []
        for st, n in zip(self.states, lengths):
            at, n = st.noise_at, n * scale
            rows.append(m._noise(at + n)[0, at:at + n].T)
            st.noise_at = at + n
        noise = noise_amp * _pad_rows(rows).transpose(1, 2)[:, :sines.shape[1]]
        return m(sines * uv + noise).squeeze(-1)

    def stft(self, source: torch.Tensor, lengths: list[int], counts: list[int], finalize: bool) -> torch.Tensor:
        """The source's next `counts[b]` centred STFT frames per row -> [B, 2K, max count] (real, imaginary)."""
        cfg = self.hift.cfg
        half = cfg.n_fft // 2
        pieces = []
        for b, (st, n, count) in enumerate(zip(self.states, lengths, counts)):
            new = source[b, :n]
            buf = F.pad(new[None], (half, 0), mode="reflect")[0] if st.source is None else torch.cat([st.source, new])
            if finalize:
                buf = F.pad(buf[None], (0, half), mode="reflect")[0]
            st.source = buf[cfg.hop_len * count:]
            st.stft_at += count
            pieces.append(buf[:cfg.hop_len * (count - 1) + cfg.n_fft])
        spec = torch.stft(_pad_rows(pieces), cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.hift.stft_window,
                          center=False, return_complex=True)
        return torch.cat([spec.real, spec.imag], dim=1)

    def istft(self, x: torch.Tensor, lengths: list[int], finalize: bool) -> list[torch.Tensor]:
        """conv_post's output -> each row's newly completed samples (overlap-add continued; centre trim at the
        stream's start, and at its end when finalising)."""
        cfg, window = self.hift.cfg, self.hift.stft_window
        n_bins, hop, n_fft = cfg.n_fft // 2 + 1, cfg.hop_len, cfg.n_fft
        magnitude = torch.exp(x[:, :n_bins]).clip(max=1e2)
        phase = torch.sin(x[:, n_bins:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        # a row's padding frames must not reach the partial sums it carries: they are masked out
        valid = (torch.arange(x.shape[2], device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None])
        valid = valid[:, None, :].to(x.dtype)  # [B, 1, T]
        frames = torch.fft.irfft(spec, n=n_fft, dim=1) * window[None, :, None] * valid  # [B, n_fft, T]
        width = hop * (frames.shape[2] - 1) + n_fft
        fold = dict(output_size=(1, width), kernel_size=(1, n_fft), stride=(1, hop))
        signal = F.fold(frames, **fold)[:, 0, 0]
        envelope = F.fold(window.pow(2)[None, :, None] * valid, **fold)[:, 0, 0]
        tail = n_fft - hop
        out = []
        for b, (st, n) in enumerate(zip(self.states, lengths)):
            sums = torch.stack([signal[b, :hop * n + tail], envelope[b, :hop * n + tail]])
            start = 0
            if st.ola is None:
                start = n_fft // 2  # the centre padding before the stream's first sample
            else:
                sums[:, :tail] += st.ola
            done = hop * n + (hop if finalize else 0)  # finalising: the trailing centre padding ends it
            st.ola = sums[:, hop * n:].clone()
            y, env = sums[0, start:done], sums[1, start:done]
            out.append((y / env).clamp(-cfg.audio_limit, cfg.audio_limit))
        return out


def _plan(states: list[HiFTStream], mels: list[torch.Tensor], finalize: bool):
    """Which rows vocode now and on which frames; rows too short for their first call keep their frames."""
    rows = []
    for r, (st, mel) in enumerate(zip(states, mels)):
        if st.held is not None:
            mel = torch.cat([st.held, mel], dim=2)
            st.held = None
        if st.frames == 0 and (mel.shape[2] == 0 or (not finalize and mel.shape[2] < MIN_FIRST_FRAMES)):
            st.held = mel if mel.shape[2] else None
            continue
        rows.append((r, mel))
    return rows


@torch.inference_mode()
def vocode_rows(hift: HiFTVocoder, streams: list[HiFTStream], mels: list[torch.Tensor], finalize: bool = False
                ) -> tuple[list[HiFTStream], list[torch.Tensor]]:
    """The new mel frames of several streams ([1, M, n_b] each) -> (their new states, their next samples [S_b]).

    A stream's samples are what `forward(accumulated mel, finalize)` adds past its previous output. The streams
    passed in are not changed (a failed call leaves them as they were): store the returned states. `finalize`: the
    streams' last call (zero look-ahead, the whole iSTFT); a first call needs more than 8 frames unless finalising
    (fewer are held until it has them)."""
    cfg = hift.cfg
    states = [st.copy() for st in streams]
    empty = mels[0].new_zeros(0) if mels else torch.zeros(0)
    out = [empty] * len(states)
    rows = _plan(states, mels, finalize)
    if not rows:
        return states, out
    active = [states[r] for r, _ in rows]
    step = _Rows(hift, active)
    lengths = [mel.shape[2] for _, mel in rows]
    totals = [st.frames + n for st, n in zip(active, lengths)]
    mel = _pad_rows([m[0] for _, m in rows])
    f0, f0_lengths, consumed = step.f0(mel, lengths, finalize)
    pre_in, pre_lengths = consumed, f0_lengths
    if finalize:
        pre_in, pre_lengths = _extend(pre_in, pre_lengths, cfg.conv_pre_look_right)
    x, x_lengths, _ = step.conv("pre", hift.conv_pre, pre_in, pre_lengths, 0)
    source = step.source(f0, f0_lengths)
    rate = int(np.prod(cfg.upsample_rates))  # last-rate frames (= STFT frames) per mel frame
    held = 0 if finalize else hift.f0_predictor.lookahead + cfg.conv_pre_look_right
    counts = [rate * (t - held) + 1 - st.stft_at for st, t in zip(active, totals)]
    s_stft = step.stft(source, [n * cfg.samples_per_frame for n in f0_lengths], counts, finalize)
    n_kernels = len(cfg.resblock_kernel_sizes)
    for i, up in enumerate(hift.ups):
        x = F.leaky_relu(x, cfg.lrelu_slope).repeat_interleave(up.stride_up, dim=2)
        x, x_lengths, _ = step.conv(f"ups.{i}", up, x, [n * up.stride_up for n in x_lengths], up.kernel_size[0] - 1)
        if i == len(hift.ups) - 1 and any(st.frames == 0 for st in active):  # reflect pad 1 at a stream's start
            x = _pad_rows([torch.cat([x[b, :, 1:2], x[b, :, :n]], dim=1) if st.frames == 0 else x[b, :, :n]
                           for b, (st, n) in enumerate(zip(active, x_lengths))])
            x_lengths = [n + (st.frames == 0) for st, n in zip(active, x_lengths)]
        down = hift.source_downs[i]
        start_pad = down.stride[0] - 1 if isinstance(down, CausalDownsample) else down.pad
        s, s_lengths, _ = step.conv(f"source_downs.{i}", down, s_stft, counts, start_pad)
        assert s_lengths == x_lengths, (s_lengths, x_lengths)  # noqa: S101 (an internal invariant)
        width = max(x_lengths)
        x = x[:, :, :width] + step.resblock(f"source_resblocks.{i}", hift.source_resblocks[i], s[:, :, :width],
                                            s_lengths)
        blocks = hift.resblocks[i * n_kernels:(i + 1) * n_kernels]
        xs = step.resblock(f"resblocks.{i * n_kernels}", blocks[0], x, x_lengths)
        for j, block in enumerate(blocks[1:], start=i * n_kernels + 1):
            xs = xs + step.resblock(f"resblocks.{j}", block, x, x_lengths)
        x = xs / n_kernels
    x, x_lengths, _ = step.conv("post", hift.conv_post, F.leaky_relu(x), x_lengths, hift.conv_post.pad)
    wavs = step.istft(x, x_lengths, finalize)
    for (r, _), st, wav, total in zip(rows, active, wavs, totals):
        st.frames = total
        made = wav if st.out is None else torch.cat([st.out, wav])
        # a non-final whole-mel call ends 1 frame (480 samples, its incomplete iSTFT overlap) before its look-ahead
        release = made.shape[0] if finalize else cfg.samples_per_frame * (total - held - 1) - st.released
        out[r], st.out = made[:release], made[release:]
        st.released += release
    return states, out


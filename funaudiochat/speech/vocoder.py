"""Mel -> wav: CosyVoice3's `CausalHiFTGenerator` (HiFT = neural source filter + iSTFTNet), checkpoint-compatible.

Shapes: B batch, M mel bins (80), F mel frames (50 Hz), L = 480 F samples (24 kHz), K = n_fft/2 + 1 bins (9),
H = nb_harmonics + 1 (9), C channels.

mel -> F0 predictor (causal convs, |Linear|) -> f0 [B, F] -> x480 -> SineGen2 harmonics + fixed noise
    -> source [B, 1, L]
mel -> conv_pre (looks 4 frames right) -> 3 x (LeakyReLU, causal upsample, + downsampled source STFT, resblocks)
    -> conv_post -> magnitude exp(x[:K]), phase sin(x[K:]) -> iSTFT (n_fft 16, hop 4) -> clamp +-0.99.

`finalize=False` (streaming): the last 3 mel frames are F0 look-ahead, the next 4 conv_pre look-ahead, and the last
480 output samples are dropped (their iSTFT overlap is incomplete): the output covers F - 8 frames.

Weight norm uses torch.nn.utils.parametrizations, so keys are `X.parametrizations.weight.original0/1` as in the
released `hift.pt`; legacy `weight_g`/`weight_v` keys load through torch's compatibility hook. `fold_weight_norm()`
replaces each parametrization by its plain weight (same numbers, less work per call).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from funaudiochat.errors import InputError
from funaudiochat.speech.cosyvoice_config import CosyVoiceConfig, HiFTConfig

MAX_SECONDS = 300  # the released fixed source noise covers 300 s


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on one side by dilation*(kernel-1): 'left' (causal) or 'right' (looks ahead)."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1, side: str = "left"):
        super().__init__(cin, cout, kernel, dilation=dilation)
        self.side = side
        self.pad = dilation * (kernel - 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, T] -> [B, C', T]. `context`: the `pad` real frames after x (right side only), else zeros."""
        if self.side == "left":
            x = F.pad(x, (self.pad, 0))
        elif context is None:
            x = F.pad(x, (0, self.pad))
        else:
            x = torch.cat([x, context], dim=2)
        return super().forward(x)


class CausalUpsample(nn.Conv1d):
    """Nearest upsampling by `stride`, then a causal conv (left pad kernel-1)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__(cin, cout, kernel)
        self.stride_up = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.repeat_interleave(self.stride_up, dim=2)
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class CausalDownsample(nn.Conv1d):
    """Strided conv (kernel 2*stride) after a left pad of stride-1."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__(cin, cout, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.stride[0] - 1, 0)))


class Snake(nn.Module):
    """x + sin(alpha x)^2 / alpha, one alpha per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Per dilation d: x += conv2(snake(conv1_d(snake(x)))), all causal."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(weight_norm(CausalConv1d(channels, channels, kernel, d)) for d in dilations)
        self.convs2 = nn.ModuleList(weight_norm(CausalConv1d(channels, channels, kernel)) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = conv2(act2(conv1(act1(x)))) + x
        return x


class F0Predictor(nn.Module):
    """`CausalConvRNNF0Predictor`: conv k4 looking 3 frames right, 4 causal convs k3, ELU; |Linear| -> f0 in Hz."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        c = cfg.f0_cond_channels
        layers: list[nn.Module] = [weight_norm(CausalConv1d(cfg.in_channels, c, 4, side="right")), nn.ELU()]
        for _ in range(4):
            layers += [weight_norm(CausalConv1d(c, c, 3)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, cfg.f0_num_class)

    @property
    def lookahead(self) -> int:
        return self.condnet[0].pad

    def forward(self, mel: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """mel [B, M, F] -> f0 [B, F] (finalize) or [B, F - 3] (the last 3 frames are context)."""
        if finalize:
            h = self.condnet[0](mel)
        else:
            h = self.condnet[0](mel[:, :, :-self.lookahead], mel[:, :, -self.lookahead:])
        for layer in self.condnet[1:]:
            h = layer(h)
        return self.classifier(h.transpose(1, 2)).squeeze(-1).abs()


def released_source_rng(cfg: CosyVoiceConfig) -> torch.Generator:
    """A CPU generator in the state the released code's global RNG has when `SineGen2` draws its fixed noise.

    Loading `cosyvoice3.yaml` seeds 0 in `CausalConditionalCFM.__init__` (then randn(1, 80, 15000)), finishes the
    flow (Embedding, Linear), builds the F0 predictor (5 convs, 1 Linear), then starts `CausalHiFTGenerator` with
    its source module. Default inits draw uniform_ (convs, Linear) and normal_ (Embedding): replay those draws.
    """
    g = torch.Generator().manual_seed(0)
    flow, hift = cfg.flow, cfg.hift
    torch.randn(1, flow.dit.mel_dim, 15000, generator=g)
    torch.empty(flow.vocab_size, flow.input_size).normal_(generator=g)
    c = hift.f0_cond_channels
    shapes = [(flow.output_size, flow.spk_embed_dim), (flow.output_size,), (c, hift.in_channels, 4), (c,)]
    shapes += [(c, c, 3), (c,)] * 4 + [(hift.f0_num_class, c), (hift.f0_num_class,)]
    for shape in shapes:
        torch.empty(shape).uniform_(generator=g)
    return g


class SourceModule(nn.Module):
    """SineGen2 (causal, fixed noise) + `l_linear` merging the harmonics: f0 at 24 kHz -> excitation.

    The fixed noise (`rand_ini`, then the uniform `sine_noise`) is drawn from `rng`: `released_source_rng(cfg)`
    reproduces the released model's; None gives a fixed noise of its own (seed 0), fine for random-weight tests.
    """

    def __init__(self, cfg: HiFTConfig, rng: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        n_harm = cfg.nb_harmonics + 1
        self.upsample_scale = cfg.samples_per_frame
        self.l_linear = nn.Linear(n_harm, 1)
        rng = rng if rng is not None else torch.Generator().manual_seed(0)
        rand_ini = torch.rand(1, n_harm, generator=rng, device="cpu")
        rand_ini[:, 0] = 0
        self.register_buffer("rand_ini", rand_ini, persistent=False)
        # the uniform noise torch.rand(1, 300 s, H) is drawn from here; a prefix is made on demand (same numbers)
        self._noise_rng_state: torch.Tensor | None = rng.get_state()
        self.register_buffer("sine_noise", torch.zeros(1, 0, n_harm, device="cpu"), persistent=False)

    def set_noise(self, rand_ini: torch.Tensor, sine_noise: torch.Tensor) -> None:
        """Use given noise (e.g. recorded from the released code): rand_ini [1, H], sine_noise [1, L_max, H]."""
        self.rand_ini = rand_ini.to(self.rand_ini)
        self.sine_noise = sine_noise.to(self.rand_ini)
        self._noise_rng_state = None

    def _noise(self, n: int) -> torch.Tensor:
        if n > self.sine_noise.shape[1]:
            max_len = MAX_SECONDS * self.cfg.sampling_rate
            if self._noise_rng_state is None or n > max_len:
                limit = self.sine_noise.shape[1] if self._noise_rng_state is None else max_len
                raise InputError(f"{n / self.cfg.sampling_rate:.1f} s of audio exceed the vocoder's fixed noise "
                                 f"({limit / self.cfg.sampling_rate:.1f} s); vocode shorter pieces")
            g = torch.Generator().set_state(self._noise_rng_state)
            length = min(max(n, 2 * self.sine_noise.shape[1], 30 * self.cfg.sampling_rate), max_len)
            self.sine_noise = torch.rand(1, length, self.rand_ini.shape[1], generator=g).to(self.rand_ini)
        return self.sine_noise[:, :n]

    def sine_waves(self, f0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f0 [B, L, 1] (Hz at the audio rate) -> harmonics + noise [B, L, H], voiced flags uv [B, L, 1]."""
        cfg, scale = self.cfg, float(self.upsample_scale)
        harmonics = torch.arange(1, cfg.nb_harmonics + 2, device=f0.device, dtype=f0.dtype).view(1, 1, -1)
        rad = (f0 * harmonics / cfg.sampling_rate) % 1  # [B, L, H] cycles per sample
        rad[:, 0, :] = rad[:, 0, :] + self.rand_ini
        # phase integrated at the frame rate, then held for each frame's samples (the released causal SineGen2)
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / scale, mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad, dim=1) * 2 * np.pi
        phase = F.interpolate(phase.transpose(1, 2) * scale, scale_factor=scale, mode="nearest").transpose(1, 2)
        sines = torch.sin(phase) * cfg.nsf_alpha
        uv = (f0 > cfg.nsf_voiced_threshold).float()
        noise_amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        noise = noise_amp * self._noise(sines.shape[1])
        return sines * uv + noise, uv

    def forward(self, sine_waves: torch.Tensor) -> torch.Tensor:  # [B, L, H] -> [B, L, 1]
        return torch.tanh(self.l_linear(sine_waves))


def hann_window(n: int) -> torch.Tensor:
    """scipy.signal.get_window('hann', n, fftbins=True) in float32 (torch.hann_window differs by 1 ulp)."""
    return torch.from_numpy((0.5 + 0.5 * np.cos(np.linspace(-np.pi, np.pi, n + 1)[:-1])).astype(np.float32))


class HiFTVocoder(nn.Module):
    """Parameter names equal the released `hift.pt` (after stripping its optional `generator.` prefix)."""

    def __init__(self, cfg: HiFTConfig, rng: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        base = cfg.base_channels
        n_bins2 = cfg.n_fft + 2  # real and imaginary STFT parts
        self.m_source = SourceModule(cfg, rng)
        self.conv_pre = weight_norm(CausalConv1d(cfg.in_channels, base, cfg.conv_pre_look_right + 1, side="right"))
        self.ups = nn.ModuleList(
            weight_norm(CausalUpsample(base // 2**i, base // 2**(i + 1), k, u))
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        # the source STFT (hop_len samples per frame) is brought down to each upsampling stage's rate
        down_rates = np.cumprod([1, *cfg.upsample_rates[::-1][:-1]])[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(down_rates, cfg.source_resblock_kernel_sizes,
                                          cfg.source_resblock_dilation_sizes)):
            ch = base // 2**(i + 1)
            self.source_downs.append(CausalConv1d(n_bins2, ch, 1) if u == 1 else
                                     CausalDownsample(n_bins2, ch, int(u) * 2, int(u)))
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(base // 2**(i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = weight_norm(CausalConv1d(base // 2**len(self.ups), n_bins2, 7))
        self.f0_predictor = F0Predictor(cfg)
        self.register_buffer("stft_window", hann_window(cfg.n_fft), persistent=False)

    def fold_weight_norm(self) -> None:
        """Replace every weight-norm parametrization by the weight it computes (identical output, faster)."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

    def source(self, mel: torch.Tensor, finalize: bool = True) -> dict[str, torch.Tensor]:
        """mel [B, M, F] -> f0 [B, F'], f0_upsampled [B, L, 1], sine_waves [B, L, H], uv, sine_merge [B, L, 1]."""
        device = self.f0_predictor.classifier.weight.device  # the released code runs it on the CPU, in fp32
        f0 = self.f0_predictor(mel.to(device, torch.float32), finalize=finalize).to(mel)
        f0_up = f0.repeat_interleave(self.cfg.samples_per_frame, dim=1).unsqueeze(-1)  # [B, L, 1]
        sine_waves, uv = self.m_source.sine_waves(f0_up)
        return {"f0": f0, "f0_upsampled": f0_up, "sine_waves": sine_waves, "uv": uv,
                "sine_merge": self.m_source(sine_waves)}

    def decode(self, mel: torch.Tensor, source: torch.Tensor, finalize: bool = True) -> torch.Tensor:
        """mel [B, M, F], source [B, 1, L] -> wav [B, S]."""
        cfg = self.cfg
        spec = torch.stft(source.squeeze(1), cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.stft_window,
                          return_complex=True)  # [B, K, L/hop + 1]
        if finalize:
            x = self.conv_pre(mel)
        else:
            look = cfg.conv_pre_look_right
            x = self.conv_pre(mel[:, :, :-look], mel[:, :, -look:])
            spec = spec[:, :, :-int(np.prod(cfg.upsample_rates)) * look]
        s_stft = torch.cat([spec.real, spec.imag], dim=1)  # [B, 2K, frames]
        n_kernels = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            blocks = self.resblocks[i * n_kernels:(i + 1) * n_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs += block(x)
            x = xs / n_kernels
        x = self.conv_post(F.leaky_relu(x))
        n_bins = cfg.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :n_bins]).clip(max=1e2)
        phase = torch.sin(x[:, n_bins:])
        spec_out = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(spec_out, cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.stft_window)
        if not finalize:
            wav = wav[:, :-cfg.samples_per_frame]
        return wav.clamp(-cfg.audio_limit, cfg.audio_limit)

    @torch.inference_mode()
    def forward(self, mel: torch.Tensor, finalize: bool = True, trace: dict | None = None) -> torch.Tensor:
        """mel [B, M, F] -> wav [B, 480 F] (finalize) or [B, 480 (F - 8)]. `trace` collects the intermediates."""
        parts = self.source(mel, finalize)
        source = parts["sine_merge"].transpose(1, 2)  # [B, 1, L]
        if not finalize:
            mel = mel[:, :, :-self.f0_predictor.lookahead]
        wav = self.decode(mel, source, finalize)
        if trace is not None:
            trace.update(parts, source=source)
        return wav

    @torch.inference_mode()
    def forward_rows(self, mels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Non-final calls of several streams as one batch: mels [1, M, F_b] (each F_b > 8) -> one wav
        [480 (F_b - 8)] per row, what `forward(mel, finalize=False)[0]` gives (up to float rounding).

        Rows are right-padded with zeros. Every layer is causal, per frame or per sample except the F0 predictor's
        first conv and conv_pre, whose look-ahead frames are the ones a non-final call holds back, and the
        STFT / iSTFT, whose frames near the padded end fall in the 480 samples a non-final call drops; so a row's
        kept samples never see its padding. (A final call uses its own end: it runs alone.)"""
        lengths = [mel.shape[2] for mel in mels]
        held = self.f0_predictor.lookahead + self.cfg.conv_pre_look_right + 1  # 8 frames a non-final call holds
        if min(lengths) <= held:
            raise ValueError(f"a non-final vocoder call needs more than {held} mel frames")
        width = max(lengths)
        batch = torch.cat([F.pad(mel, (0, width - mel.shape[2])) for mel in mels])
        wav = self.forward(batch, finalize=False)
        hop = self.cfg.samples_per_frame
        return [wav[b, :hop * (n - held)] for b, n in enumerate(lengths)]

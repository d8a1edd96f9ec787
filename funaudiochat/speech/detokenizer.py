"""Speech tokens (25 Hz, codes < 6561) -> 24 kHz waveform with the CosyVoice3 flow + HiFT, offline or streaming.

    detok = Detokenizer.from_dir("Fun-CosyVoice3-0.5B-2512")  # flow.pt, hift.pt (+ cosyvoice3.yaml, spk2info.pt)
    wav = detok.token2wav(tokens)                              # float32 numpy [S], detok.sample_rate = 24000
    session = detok.stream(hop=15)                             # the web demo's hop; the released default is 25
    for piece in token_pieces:
        for chunk in session.push(piece): play(chunk)
    play(session.finalize())

Offline (`token2wav`, Fun-Audio-Chat `utils/cosyvoice_detokenizer.py`): 30 s (750-token) segments, a last segment
shorter than 2 s merged with the one before and the pair split in half; each segment is one finalising flow + HiFT
call with full attention; the pieces are concatenated without cross-fade.

Streaming (`CosyVoice3Model.token2wav` driven like its `tts(stream=True)` loop): once hop + 3 look-ahead tokens past
the offset are there, the flow runs on all tokens so far (not finalising: the last 3 are context), its new mel frames
are appended to the accumulated mel, HiFT re-runs on the whole accumulated mel (not finalising: the last 8 frames are
held back) and only the samples past the previous output are returned. `finalize()` runs the flow with full attention
and HiFT finalising. Chunk boundaries are seamless because HiFT is causal and its noise is fixed.
`vocoder="incremental"` (the default) makes the same samples (up to float rounding) by vocoding only each chunk's new
mel frames, each HiFT layer continuing from its state (`hift_stream.py`), so a chunk's HiFT cost does not grow with
the answer; `vocoder="whole"` re-runs HiFT on the whole accumulated mel as the released loop does.

Many streams at once (a server's sessions): `feed` each its tokens, then `drain(streams)` makes every ready chunk
with one batched flow call and one batched HiFT call per round (rows right-padded; each row's audio is what the
stream makes alone, up to float rounding: tests/test_detokenizer_batch.py). `push` is `feed` + `drain([self])`.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from funaudiochat.errors import CheckpointError, InputError, SessionClosedError
from funaudiochat.speech.cosyvoice_config import CosyVoiceConfig, load_cosyvoice_config
from funaudiochat.speech.flow import TokenToMelFlow, released_flow_noise
from funaudiochat.speech.flow_cache import FlowCache, cached_rows
from funaudiochat.speech.hift_stream import HiFTStream, vocode_rows
from funaudiochat.speech.vocoder import HiFTVocoder, released_source_rng

log = logging.getLogger(__name__)

SEGMENT_TOKENS = 750  # 30 s
MIN_LAST_SEGMENT_TOKENS = 50  # 2 s
DEFAULT_SPEAKER = "中文女"


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a detokenizer folder needs flow.pt and hift.pt "
                              f"(from Fun-CosyVoice3-0.5B-2512)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or non-tensor file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch state dict ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, assign: bool = False) -> None:
    """Strict load; a mismatch becomes a CheckpointError that counts and names the offending tensors."""
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError:
        ours = module.state_dict()
        problems = [(what, names) for what, names in (
            ("missing", [k for k in ours if k not in state]),
            ("unexpected", [k for k in state if k not in ours]),
            ("with another shape", [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
                                    for k, v in ours.items() if k in state and state[k].shape != v.shape])) if names]
        summary = "; ".join(f"{len(names)} {what}, e.g. {', '.join(names[:3])}" for what, names in problems)
        raise CheckpointError(f"{path} does not fit the configured model ({summary}); is cosyvoice3.yaml "
                              f"from the same model?") from None


def load_hift_state(hift: HiFTVocoder, path: Path) -> None:
    """hift.pt as released (optionally `generator.`-prefixed, legacy weight_g/weight_v, or weight norm folded)."""
    state = {k.replace("generator.", ""): v for k, v in load_state_dict(path).items()}
    if "conv_pre.weight" in state:
        hift.fold_weight_norm()
    load_into(hift, state, path)


def load_speakers(path: Path) -> dict[str, torch.Tensor]:
    """spk2info.pt: {name: {"embedding": [1, 192], ...}} -> {name: [1, 192]}."""
    info = load_state_dict(path)
    try:
        return {name: entry["embedding"].reshape(1, -1).float() for name, entry in info.items()}
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: expected {{speaker name: {{'embedding': tensor [1, 192]}}}}") from None


def check_tokens(tokens, vocab_size: int) -> torch.Tensor:
    """Any int sequence -> [1, N] long. Codes >= vocab_size are dropped with a warning (as the released pipeline
    does); negative codes are an error."""
    try:
        t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"speech tokens must be a sequence of integers ({err})") from None
    if t.dtype == torch.bool or (t.is_floating_point() and not torch.equal(t, t.round())):
        raise InputError("speech tokens must be integers")
    t = t.long()
    if (t < 0).any():
        raise InputError(f"negative speech token {int(t.min())}; codes must be in [0, {vocab_size})")
    keep = t < vocab_size
    if not keep.all():
        log.warning("dropping %d speech token(s) >= %d (not speech codes)", int((~keep).sum()), vocab_size)
        t = t[keep]
    return t.unsqueeze(0)


def segment(n_tokens: int) -> list[tuple[int, int]]:
    """(start, end) of the 30 s segments; a last one under 2 s is merged with the previous and the pair halved."""
    bounds = [(s, min(s + SEGMENT_TOKENS, n_tokens)) for s in range(0, n_tokens, SEGMENT_TOKENS)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_LAST_SEGMENT_TOKENS:
        start, end = bounds[-2][0], bounds[-1][1]
        mid = start + (end - start) // 2
        bounds[-2:] = [(start, mid), (mid, end)]
    return bounds


class Detokenizer:
    """Flow + HiFT with a speaker x-vector. `sample_rate` = 24000."""

    def __init__(self, flow: TokenToMelFlow, hift: HiFTVocoder, speakers: dict[str, torch.Tensor] | None = None,
                 speaker=None, speaker_encoder=None):
        self.flow, self.hift = flow.eval(), hift.eval()
        self.sample_rate = hift.cfg.sampling_rate
        self.speakers = dict(speakers or {})
        self.speaker_encoder = speaker_encoder  # funaudiochat.speech.speaker.SpeakerEncoder, for wav speakers
        self.device = flow.spk_embed_affine_layer.weight.device
        self.embedding = None  # the default speaker's x-vector [1, 192]
        if speaker is not None or self.speakers:
            self.embedding = self.speaker_embedding(speaker)

    @classmethod
    def from_dir(cls, directory: str | Path, speaker=None, device: str | torch.device = "cpu") -> "Detokenizer":
        """Load `directory`: flow.pt, hift.pt; optional cosyvoice3.yaml (else released defaults), spk2info.pt,
        campplus.onnx. `speaker`: a name in spk2info.pt (default "中文女"), a .pt/.npy 192-d vector, or a wav."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"detokenizer folder {directory} does not exist")
        yaml_path = directory / "cosyvoice3.yaml"
        cfg = load_cosyvoice_config(yaml_path) if yaml_path.is_file() else CosyVoiceConfig()
        flow_state = load_state_dict(directory / "flow.pt")
        hift_path = directory / "hift.pt"
        if not hift_path.is_file():
            load_state_dict(hift_path)  # raises, naming the file
        with torch.device("meta"):  # no random init of ~330M parameters that the checkpoint replaces
            flow = TokenToMelFlow(cfg.flow, noise=released_flow_noise(cfg.flow.dit.mel_dim))
        load_into(flow, flow_state, directory / "flow.pt", assign=True)
        hift = HiFTVocoder(cfg.hift, rng=released_source_rng(cfg))
        load_hift_state(hift, hift_path)
        hift.fold_weight_norm()
        speakers = {}
        for name in ("spk2info.pt", "new_spk2info.pt"):
            if (directory / name).is_file():
                speakers = load_speakers(directory / name)
                break
        encoder = None
        if (directory / "campplus.onnx").is_file():
            from funaudiochat.speech.speaker import SpeakerEncoder
            encoder = SpeakerEncoder(directory / "campplus.onnx")
        flow.to(device)
        hift.to(device)
        hift.f0_predictor.to("cpu")  # the released code runs the F0 predictor on the CPU (its precision matters)
        return cls(flow, hift, speakers, speaker, encoder)

    def speaker_embedding(self, speaker=None) -> torch.Tensor:
        """A speaker -> x-vector [1, 192]: None (the default), a name, a tensor/array, or a .pt/.npy/.wav path."""
        if speaker is None:
            if self.embedding is not None:
                return self.embedding
            if not self.speakers:
                raise InputError("no speaker: the detokenizer folder has no spk2info.pt; pass speaker= a 192-d "
                                 "x-vector (.pt/.npy) or a reference wav")
            speaker = DEFAULT_SPEAKER if DEFAULT_SPEAKER in self.speakers else next(iter(self.speakers))
        dim = self.flow.cfg.spk_embed_dim
        if isinstance(speaker, (torch.Tensor, np.ndarray)):
            vec = torch.as_tensor(speaker, dtype=torch.float32)
        elif isinstance(speaker, str) and speaker in self.speakers:
            vec = self.speakers[speaker]
        elif Path(speaker).suffix.lower() in (".pt", ".npy") and Path(speaker).is_file():
            path = Path(speaker)
            try:
                vec = torch.as_tensor(np.load(path) if path.suffix.lower() == ".npy"
                                      else torch.load(path, map_location="cpu", weights_only=True), dtype=torch.float32)
            except Exception as err:  # not a tensor file, or not one tensor
                raise InputError(f"speaker {path}: expected one 192-d tensor/array ({err})") from None
        elif Path(speaker).is_file():
            if self.speaker_encoder is None:
                raise InputError(f"speaker {speaker}: a reference wav needs campplus.onnx in the detokenizer folder")
            vec = self.speaker_encoder(speaker)
        else:
            known = ", ".join(self.speakers) or "none (no spk2info.pt)"
            raise InputError(f"unknown speaker {speaker!r}: not a file and not a known name; known names: {known}")
        if vec.numel() != dim or not torch.isfinite(vec).all():
            raise InputError(f"speaker embedding must be {dim} finite numbers, got shape {tuple(vec.shape)}")
        return vec.reshape(1, dim).to(self.device)

    def tokens_to_wav(self, tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """One finalising call with full attention: [1, N] -> [1, 960 N]."""
        mel = self.flow.inference(tokens.to(self.device), embedding, finalize=True, streaming=False)
        return self.hift(mel, finalize=True)

    @torch.inference_mode()
    def token2wav(self, tokens, speaker=None) -> np.ndarray:
        """All tokens at once -> float32 waveform [960 N] at `sample_rate`."""
        t = check_tokens(tokens, self.flow.cfg.vocab_size)
        if t.shape[1] == 0:
            raise InputError("no speech tokens to synthesise (empty list, or every code was >= 6561)")
        embedding = self.speaker_embedding(speaker)
        pieces = [self.tokens_to_wav(t[:, a:b], embedding) for a, b in segment(t.shape[1])]
        return torch.cat(pieces, dim=1)[0].float().cpu().numpy()

    def stream(self, speaker=None, hop: int = 15, chunk_attention: bool = True, flow_window: int | None = None,
               hift_reset: int | None = None, vocoder: str = "incremental", flow_cache: bool = True,
               max_hop: int | None = None) -> "StreamingDetokenizer":
        """A streaming session; see `StreamingDetokenizer`. Its chunks keep `hop` tokens: `max_hop` (growing chunks,
        the mini's Piper detokenizer) may only be None or `hop` here, the chunk mask and the flow cache being laid
        out per hop."""
        if max_hop is not None and max_hop != hop:
            raise InputError(f"the CosyVoice3 detokenizer streams chunks of a fixed hop ({hop} tokens); growing "
                             f"chunks (max_hop {max_hop}) are for the mini's Piper detokenizer")
        return StreamingDetokenizer(self, self.speaker_embedding(speaker), hop, chunk_attention, flow_window,
                                    hift_reset, vocoder, flow_cache)


@dataclass
class StreamState:
    tokens: list[int] = field(default_factory=list)  # tokens of the current flow window
    token_offset: int = 0  # tokens of the window whose mel is already made
    mel: torch.Tensor | None = None  # [1, M, F] accumulated mel HiFT runs on
    hift: HiFTStream = field(default_factory=HiFTStream)  # the incremental vocoder's state (vocoder="incremental")
    speech_offset: int = 0  # samples of HiFT's output already returned
    dropped_tokens: int = 0  # tokens dropped from the flow window since the last HiFT reset
    flow: FlowCache = field(default_factory=FlowCache)  # keys and values of the window's completed chunks
    closed: bool = False


class StreamingDetokenizer:
    """push(tokens) -> audio chunks as soon as `hop` + 3 look-ahead tokens are there; finalize() -> the rest.

    `hop`: tokens per chunk (15 in the web demo = 0.6 s; the released CosyVoice3 default is 25).
    `chunk_attention`: non-final chunks use the DiT chunk mask (the official CosyVoice3 stream path); False gives
        full attention, as the Fun-Audio-Chat web demo calls it.
    `flow_window` / `hift_reset`: the web demo's bounds (200 / 500 tokens): once the offset reaches `flow_window`
        the oldest `flow_window` tokens leave the flow context; after `hift_reset` dropped tokens the accumulated mel
        is cleared too (the 8 frames HiFT held back are then lost, as in the web demo). None (default) keeps
        everything, as the official loop does: each chunk's cost then grows with the length of the answer.
    `vocoder`: "incremental" (default) vocodes only each chunk's new mel frames, continuing HiFT's causal state: the
        same samples as "whole" (the released loop: HiFT re-runs on the whole accumulated mel) up to float rounding,
        at a cost per chunk that does not grow with the answer.
    `flow_cache` (with chunk attention): each non-final flow call computes only the frames from the window's first
        incomplete chunk on, reusing the keys and values of the completed ones (`speech/flow_cache.py`): the same
        mel up to float rounding, at a cost per chunk that does not grow with the window.
    The Fun-Audio-Chat web demo is `stream(hop=15, chunk_attention=False, flow_window=200, hift_reset=500)`.
    """

    def __init__(self, detok: Detokenizer, embedding: torch.Tensor, hop: int = 15, chunk_attention: bool = True,
                 flow_window: int | None = None, hift_reset: int | None = None, vocoder: str = "incremental",
                 flow_cache: bool = True):
        if hop < 1:
            raise InputError(f"hop must be at least 1 token, got {hop}")
        if vocoder not in VOCODER_MODES:
            raise InputError(f"vocoder must be one of {', '.join(VOCODER_MODES)}, got {vocoder!r}")
        self.incremental = vocoder == "incremental"
        self.detok, self.embedding, self.hop = detok, embedding, hop
        self.chunk_attention, self.flow_window, self.hift_reset = chunk_attention, flow_window, hift_reset
        self.flow_cache = flow_cache and chunk_attention  # full attention: every frame sees the newest ones
        self.lookahead = detok.flow.cfg.pre_lookahead_len
        self.state = StreamState()

    @property
    def sample_rate(self) -> int:
        return self.detok.sample_rate

    @torch.inference_mode()
    def _final(self) -> np.ndarray:
        """`CosyVoice3Model.token2wav(finalize=True)` on the current state: full attention, HiFT finalising. It
        runs alone, not batched: the vocoder's final STFT / iSTFT frames use the row's own end."""
        detok, st = self.detok, self.state
        new = None
        if len(st.tokens) > st.token_offset:
            tokens = torch.tensor(st.tokens, dtype=torch.long, device=detok.device).unsqueeze(0)
            mel = detok.flow.inference(tokens, self.embedding, finalize=True, streaming=False)
            new = self._new_frames(mel)
            st.mel = self._accumulated(new)
        if st.mel is None:
            return np.zeros(0, dtype=np.float32)
        if self.incremental:
            new = st.mel[:, :, :0] if new is None else new
            (st.hift,), (wav,) = vocode_rows(detok.hift, [st.hift], [new], finalize=True)
        else:
            wav = detok.hift(st.mel, finalize=True)[0, st.speech_offset:]
        st.speech_offset += wav.shape[0]
        return wav.float().cpu().numpy()

    def feed(self, tokens) -> None:
        """Add tokens without synthesising anything (`drain` makes the chunks that became ready)."""
        if self.state.closed:
            raise SessionClosedError("this streaming session was finalised; start a new one with stream()")
        self.state.tokens.extend(check_tokens(tokens, self.detok.flow.cfg.vocab_size)[0].tolist())

    def push(self, tokens, ahead=None) -> list[np.ndarray]:
        """Add tokens; return the audio chunks (float32 numpy) that became ready, possibly none. `ahead` (the units
        a Piper stream is told to expect, `PiperStream.push`) is accepted and unused: S3 tokens have no units."""
        self.feed(tokens)
        return drain([self])[0]

    def _window(self) -> list[int] | None:
        """The tokens of the next chunk's flow call (hop + look-ahead past the offset), or None: not ready."""
        st = self.state
        end = st.token_offset + self.hop + self.lookahead
        return st.tokens[:end] if len(st.tokens) >= end else None

    def _new_frames(self, mel: torch.Tensor, start: int = 0) -> torch.Tensor:
        """This chunk's new mel frames in the flow output `mel` (the window's frames from `start` on)."""
        return mel[:, :, self.state.token_offset * self.detok.flow.cfg.token_mel_ratio - start:]

    def _accumulated(self, new: torch.Tensor) -> torch.Tensor:
        """The accumulated mel HiFT runs on once this chunk's `new` frames are in."""
        return new if self.state.mel is None else torch.cat([self.state.mel, new], dim=2)

    def _commit(self, mel: torch.Tensor, wav: torch.Tensor | None, hift: HiFTStream | None = None,
                flow: FlowCache | None = None) -> np.ndarray:
        """Take a chunk's accumulated mel and HiFT output (None: too few frames yet; incremental: the new samples
        and the vocoder's new state `hift`) and the flow's kept keys and values; move past its hop, dropping the
        oldest tokens (and the mel) at the flow window / HiFT reset bounds. -> the chunk's new samples."""
        st = self.state
        st.mel = mel
        if flow is not None:
            st.flow = flow
        chunk = np.zeros(0, dtype=np.float32)
        if hift is not None:
            st.hift = hift
            chunk = wav.float().cpu().numpy()
            st.speech_offset += chunk.shape[0]
        elif wav is not None:
            chunk = wav[st.speech_offset:].float().cpu().numpy()
            st.speech_offset += chunk.shape[0]
        st.token_offset += self.hop
        if self.flow_window is not None and st.token_offset >= self.flow_window:
            st.token_offset -= self.flow_window
            st.tokens = st.tokens[self.flow_window:]
            st.flow = FlowCache()  # a new window: its frames start again at position 0
            st.dropped_tokens += self.flow_window
            if self.hift_reset is not None and st.dropped_tokens >= self.hift_reset:
                st.dropped_tokens, st.mel, st.speech_offset, st.hift = 0, None, 0, HiFTStream()
        return chunk

    def finalize(self) -> np.ndarray:
        """Synthesise what is left (full attention, HiFT finalising) and close the session."""
        st = self.state
        if st.closed:
            raise SessionClosedError("this streaming session was already finalised")
        st.closed = True
        st.flow = FlowCache()  # the final call attends to the whole window: the kept keys and values go now
        if not st.tokens and st.mel is None:
            return np.zeros(0, dtype=np.float32)
        return self._final()


MAX_PADDING = 1.5  # a batched call computes at most this many times the frames its rows need alone
VOCODER_MODES = ("incremental", "whole")


def drain(streams: list[StreamingDetokenizer], isolate: bool = False, rounds: int | None = None) -> list:
    """Every chunk that is ready in each stream, as `push` makes them one stream at a time, with the non-final flow
    and HiFT calls of all the streams batched: per round, each stream with a ready chunk contributes one row (rows of
    similar lengths share a call, right-padded: `TokenToMelFlow.inference_rows`, then `hift_stream.vocode_rows` on
    the new frames, or `HiFTVocoder.forward_rows` on the whole accumulated mel with vocoder="whole").
    A stream's state moves only once its round has succeeded. -> the new chunks of each stream, in order.
    `isolate`: a failed batched round is retried stream by stream, and a stream that fails alone gets its exception
    in place of its chunks (the others go on); otherwise the exception is raised. `rounds`: stop after that many
    rounds (at most that many chunks per stream; a server delivers them before the rest, and lets new streams in)."""
    out: list = [[] for _ in streams]
    for _ in itertools.count() if rounds is None else range(rounds):
        ready = [(i, s) for i, s in enumerate(streams) if isinstance(out[i], list) and s._window() is not None]
        if not ready:
            break
        groups: dict[tuple, list] = {}
        for i, s in ready:  # streams of one detokenizer, attention mode and vocoder mode can share a call
            groups.setdefault((id(s.detok), s.chunk_attention, s.incremental, s.flow_cache), []).append((i, s))
        for group in groups.values():
            try:
                chunks = _round([s for _, s in group])
            except Exception as err:
                if not isolate:
                    raise
                log.warning("a batched detokenizer round of %d streams failed (%s); retrying them one by one",
                            len(group), err)
                chunks = [_alone(s) for _, s in group]
            for (i, _), chunk in zip(group, chunks):
                if isinstance(chunk, Exception):
                    out[i] = chunk
                else:
                    out[i].append(chunk)
    return out


def _alone(stream: StreamingDetokenizer):
    """One round of one stream: its chunk, or the exception it raised."""
    try:
        return _round([stream])[0]
    except Exception as err:
        return err


@torch.inference_mode()
def _round(streams: list[StreamingDetokenizer]) -> list[np.ndarray]:
    """One chunk of each stream (all ready, one detokenizer): batched flow, then batched HiFT, then commit."""
    detok = streams[0].detok
    windows = [s._window() for s in streams]
    mels: list = [None] * len(streams)
    news: list = [None] * len(streams)
    flows: list = [None] * len(streams)
    for rows in pack([len(w) for w in windows]):
        embeddings = torch.cat([streams[r].embedding for r in rows])
        if streams[0].flow_cache:
            got, kept = cached_rows(detok.flow, [windows[r] for r in rows], embeddings,
                                    [streams[r].state.flow for r in rows])
            starts = [streams[r].state.flow.frames for r in rows]
        else:
            got = detok.flow.inference_rows([windows[r] for r in rows], embeddings,
                                            streaming=streams[0].chunk_attention)
            kept, starts = [None] * len(rows), [0] * len(rows)
        for r, mel, flow, start in zip(rows, got, kept, starts):
            news[r] = streams[r]._new_frames(mel, start)
            mels[r], flows[r] = streams[r]._accumulated(news[r]), flow
    if streams[0].incremental:  # HiFT on each stream's new frames only (about one hop each), continuing its state
        states: list = [None] * len(streams)
        wavs = [None] * len(streams)
        for rows in pack([news[r].shape[2] for r in range(len(streams))]):
            got = vocode_rows(detok.hift, [streams[r].state.hift for r in rows], [news[r] for r in rows])
            for r, state, wav in zip(rows, *got):
                states[r], wavs[r] = state, wav
        return [s._commit(*args) for s, *args in zip(streams, mels, wavs, states, flows)]
    wavs: list = [None] * len(streams)
    vocode = [r for r, mel in enumerate(mels) if mel.shape[2] > 8]
    for rows in pack([mels[r].shape[2] for r in vocode]):
        rows = [vocode[j] for j in rows]
        for r, wav in zip(rows, detok.hift.forward_rows([mels[r] for r in rows])):
            wavs[r] = wav
    return [s._commit(mel, wav, None, flow) for s, mel, wav, flow in zip(streams, mels, wavs, flows)]


def pack(lengths: list[int], slack: float = MAX_PADDING) -> list[list[int]]:
    """Indices of `lengths` in groups to be right-padded to their longest: longest first, a row joins the group
    while the group's padded size stays within `slack` times the sum of its rows' own lengths."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * lengths[group[0]] <= slack * (total + lengths[i]):
            group.append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups

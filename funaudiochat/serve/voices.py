"""Answer voices: the detokenizer's speaker names plus voices registered from a reference recording.

A registered voice is the reference's speaker x-vector (CAM++, `campplus.onnx` in the detokenizer folder): the
answer's speech tokens are rendered with that speaker's timbre. Voices come from `POST /v1/voices` or from a folder
given at start (`--voices DIR`: each .wav/.flac/.mp3 file, or a .pt/.npy 192-d vector, named by its file stem).
Registered voices live in memory, at most `max_voices`.
"""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import torch

from funaudiochat.errors import InputError
from funaudiochat.serve.api_errors import bad_request

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


class Voices:
    def __init__(self, detokenizer, folder: str | Path | None = None, max_voices: int = 64):
        self.detok, self.max_voices = detokenizer, max_voices
        self.registered: dict[str, torch.Tensor] = {}
        self.created: dict[str, int] = {}
        self._lock = threading.Lock()
        if folder is not None:
            self.load_folder(Path(folder))

    def load_folder(self, folder: Path) -> None:
        if not folder.is_dir():
            raise InputError(f"--voices {folder}: not a folder")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in AUDIO_SUFFIXES + (".pt", ".npy"):
                if self.detok is None:
                    raise InputError("--voices needs --detokenizer")
                self._add(path.stem, self.detok.speaker_embedding(str(path)))

    def names(self) -> list[str]:
        builtin = list(self.detok.speakers) if self.detok is not None else []
        return builtin + [n for n in self.registered if n not in builtin]

    def resolve(self, name: str):
        """A voice name -> what `Detokenizer.stream(speaker=...)` takes; unknown names are a 400."""
        if name in self.registered:
            return self.registered[name]
        if self.detok is not None and name in self.detok.speakers:
            return name
        known = ", ".join(self.names()) or "none"
        hint = " (register one with POST /v1/voices)" if self.can_register else ""
        raise bad_request(f"unknown voice {name!r}; known voices: {known}{hint}", "audio.voice", "invalid_value")

    @property
    def can_register(self) -> bool:
        """Whether reference recordings can become voices: the detokenizer has a speaker model (CosyVoice3's
        campplus.onnx); the mini's Piper voice is fixed."""
        return self.detok is not None and self.detok.speaker_encoder is not None

    def register(self, name: str, wav_16k) -> dict:
        """Register a voice from 16 kHz reference audio -> its description."""
        if not isinstance(name, str) or not NAME.match(name):
            raise bad_request("'name' must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit",
                              "name", "invalid_value")
        if self.detok is None:
            raise bad_request("this server has no detokenizer: voices cannot be registered", "file")
        if not self.can_register:
            raise bad_request(f"this detokenizer cannot take a new voice (it has no speaker model; a CosyVoice3 "
                              f"folder with campplus.onnx does): its voices are {', '.join(self.names())}",
                              "file", "unsupported")
        if name in self.detok.speakers:
            raise bad_request(f"{name!r} is a built-in voice; choose another name", "name", "invalid_value")
        if len(wav_16k) < 16000:
            raise bad_request("the reference recording must be at least 1 s long", "file", "audio_too_short")
        try:
            vec = self.detok.speaker_embedding(torch.as_tensor(self.detok.speaker_encoder(wav_16k)))
        except InputError as err:
            raise bad_request(str(err), "file", "invalid_audio") from None
        self._add(name, vec)
        return self.describe(name)

    def _add(self, name: str, vec: torch.Tensor) -> None:
        with self._lock:
            if name not in self.registered and len(self.registered) >= self.max_voices:
                raise bad_request(f"at most {self.max_voices} voices can be registered", "name", "limit_reached")
            self.registered[name] = vec
            self.created[name] = int(time.time())

    def describe(self, name: str) -> dict:
        return {"id": name, "object": "voice", "name": name,
                "source": "registered" if name in self.registered else "builtin",
                "created_at": self.created.get(name)}

"""A real `funaudiochat serve` process for the WebSocket and browser tests: a tiny random checkpoint and a tiny
CosyVoice3 folder (so audio really comes out), on a free 127.0.0.1 port; and a spoken question (Piper).
"""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from funaudiochat.model.checkpoint import save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from tests.helpers import make_tiny_tokenizer, write_tiny_detokenizer

QUESTION = "What is the capital of France?"


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://")

    def get(self, path: str) -> tuple[int, dict | str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as reply:
                body = reply.read().decode()
                status = reply.status
        except urllib.error.HTTPError as err:
            body, status = err.read().decode(), err.code
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def healthy(self) -> bool:
        return self.proc.poll() is None and self.get("/health") == (200, {"status": "ok"})

    def sessions(self) -> int:
        return self.get("/ready")[1]["sessions"]

    def wait_idle(self, timeout: float = 30.0) -> int:
        """Wait until no session holds a batch row; -> the count then."""
        deadline = time.monotonic() + timeout
        while self.sessions() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.sessions()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(folder: Path, trained: dict | None = None) -> tuple[Path, Path]:
    """A random tiny checkpoint (large init: varied tokens and speech codes) and a tiny detokenizer folder.
    `trained`: the config's record of trained parts (e.g. {"hearing": False}: a checkpoint that cannot hear yet)."""
    torch.manual_seed(0)
    cfg = tiny()
    if trained is not None:
        cfg.trained = trained
    model = FunAudioChatModel(cfg)
    model.init_weights(0.3)
    save_model(model, folder / "ckpt")
    make_tiny_tokenizer(folder / "ckpt")
    return folder / "ckpt", write_tiny_detokenizer(folder / "detok")


@contextmanager
def running_server(folder: Path, *extra: str, max_seq_len: int = 1024, trained: dict | None = None,
                   env: dict | None = None):
    """`funaudiochat serve` on the tiny model; `max_seq_len` also bounds an answer's length (prompt + answer);
    `env`: variables added to the server's environment."""
    ckpt, detok = tiny_model(folder, trained)
    port = free_port()
    log = folder / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "funaudiochat.cli", "serve", "--model", str(ckpt),
                                 "--detokenizer", str(detok), "--port", str(port), "--max-seq-len", str(max_seq_len),
                                 "--threads", "1", *extra], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()}")
            try:
                if server.healthy():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up in 180 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@functools.lru_cache(maxsize=None)
def _spoken(rate: int) -> np.ndarray:
    from funaudiochat.data import synth

    return synth.synthesize(synth.make_utterance({"id": "q", "text": QUESTION, "voice": "piper"}), rate)


def spoken_question(rate: int = 24000, silence_before: float = 0.5, silence_after: float = 1.5) -> np.ndarray:
    """The question, spoken by the packaged Piper voice (synthesised once per test run), with silence around it
    (float32 mono at `rate`)."""
    wav = _spoken(rate)
    return np.concatenate([np.zeros(int(silence_before * rate), np.float32), wav,
                           np.zeros(int(silence_after * rate), np.float32)]).astype(np.float32)

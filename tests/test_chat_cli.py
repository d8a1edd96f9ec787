"""`funaudiochat chat` as a user runs it: typed turns, an audio turn, a bad turn that must not end the session."""
import subprocess
import sys

import torch

from funaudiochat.model.checkpoint import save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from tests.helpers import make_tiny_tokenizer, words, write_wav


def test_chat_session_from_the_terminal(tmp_path):
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    save_model(model, tmp_path / "ckpt")
    make_tiny_tokenizer(tmp_path / "ckpt")
    wav = write_wav(tmp_path / "q.wav", 0.8, freq=300)
    turns = "\n".join([words([40, 41]), f"/audio {wav} {words([42])}", "/audio /nowhere.wav", "/reset",
                       words([43]), "/quit", words([44])]) + "\n"
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "chat", "--model", str(tmp_path / "ckpt"),
                          "--max-new-tokens", "6", "--seed", "1", "--mode", "s2t"],
                         input=turns, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("assistant: ") == 3  # the bad audio turn is refused before answering; /quit ends it
    assert "no such file" in run.stderr and "history cleared" in run.stderr
    assert "Traceback" not in run.stderr

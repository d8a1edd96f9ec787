"""`funaudiochat chat` as a user runs it: typed turns, an audio turn, a bad turn that must not end the session."""
import signal
import subprocess
import sys
import threading
import time

import torch

from funaudiochat.engine.cli_chat import DOUBLE_INTERRUPT_S
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


def _endless_checkpoint(folder):
    """A tiny model whose <|im_end|> logit is 0 while some other logit is always higher: greedy answers never end."""
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    with torch.no_grad():
        model.language_model.lm_head.weight[502] = 0
    save_model(model, folder)
    make_tiny_tokenizer(folder)
    return folder


class _Pipe:
    """Collects a child's output stream in a thread; `wait_for` blocks until a text shows up (or fails)."""

    def __init__(self, stream):
        self.text, self.lock = "", threading.Lock()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for chunk in iter(lambda: stream.read1(4096), b""):
            with self.lock:
                self.text += chunk.decode(errors="replace")

    def wait_for(self, predicate, timeout=240.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if predicate(self.text):
                    return
            time.sleep(0.05)
        raise AssertionError(f"timed out; output so far: {self.text[-2000:]}")


def test_ctrl_c_stops_the_answer_twice_quits_and_commands_are_not_sent(tmp_path):
    ckpt = _endless_checkpoint(tmp_path / "ckpt")
    proc = subprocess.Popen([sys.executable, "-m", "funaudiochat.cli", "chat", "--model", str(ckpt), "--mode", "s2t",
                             "--max-new-tokens", "3000", "--greedy"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = _Pipe(proc.stdout), _Pipe(proc.stderr)
    try:
        def answering(n):  # the n-th answer has streamed a few words
            return lambda t: t.count("assistant: ") == n and len(t.split("assistant: ")[-1].split()) >= 3

        proc.stdin.write(words([40, 41]).encode() + b"\n")
        proc.stdin.flush()
        out.wait_for(answering(1))
        proc.send_signal(signal.SIGINT)  # stops this answer only
        err.wait_for(lambda t: "answer stopped" in t)
        time.sleep(DOUBLE_INTERRUPT_S + 0.2)
        proc.send_signal(signal.SIGINT)  # between answers: a hint, the chat goes on
        err.wait_for(lambda t: "Ctrl-C again" in t)
        # commands that are not sent to the model, a line that is not UTF-8, then a real turn
        proc.stdin.write(b"/audio\n/translate this\ncaf\xe9\n//" + words([42]).encode() + b"\n")
        proc.stdin.flush()
        out.wait_for(answering(2))
        time.sleep(DOUBLE_INTERRUPT_S + 0.2)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # a second Ctrl-C within the window quits
        assert proc.wait(timeout=120) == 130
    finally:
        proc.kill()
        proc.wait()
    err.wait_for(lambda t: "interrupted" in t, timeout=10)
    assert "/audio needs a file: /audio PATH [text]" in err.text
    assert "unknown command /translate" in err.text
    assert "input: is not valid UTF-8 (byte 0xe9" in err.text
    assert out.text.count("assistant: ") == 2 and "Traceback" not in err.text

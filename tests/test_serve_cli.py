"""`funaudiochat serve` as a user starts it: a real process on a free loopback port answers, stops cleanly on Ctrl-C;
a taken port or a bad option is a one-line error."""
import argparse
import signal
import socket
import subprocess
import sys
import time

import httpx2 as httpx
import pytest
import torch

from funaudiochat.errors import InputError
from funaudiochat.model.checkpoint import save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.presets import tiny
from funaudiochat.serve import cli
from tests.helpers import make_tiny_tokenizer, words

CMD = [sys.executable, "-m", "funaudiochat.cli", "serve"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_and_stops_on_ctrl_c(tmp_path):
    torch.manual_seed(0)
    model = FunAudioChatModel(tiny())
    model.init_weights(0.3)
    save_model(model, tmp_path / "ckpt")
    make_tiny_tokenizer(tmp_path / "ckpt")
    port = _free_port()
    proc = subprocess.Popen(CMD + ["--model", str(tmp_path / "ckpt"), "--port", str(port), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not become ready"
            time.sleep(0.2)
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "ckpt", "messages": [{"role": "user", "content": words([40, 41])}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        with socket.socket() as s:  # bound to loopback only
            assert s.connect_ex(("127.0.0.1", port)) == 0
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "Traceback" not in out


def test_taken_port_and_bad_options_are_clear_errors(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = subprocess.run(CMD + ["--model", str(tmp_path / "none"), "--port", str(port)], capture_output=True,
                             text=True, timeout=120)
    assert run.returncode == 1
    assert f"funaudiochat serve: error: cannot listen on 127.0.0.1:{port}" in run.stderr
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    for option, value, message in (("--max-sessions", "0", "--max-sessions must be >= 1"),
                                   ("--wait-timeout", "0", "must be > 0"),
                                   ("--early-answer-ms", "-1", r"--early-answer-ms must be within \[0, 5000\]")):
        with pytest.raises(InputError, match=message):
            cli.build_context(parser.parse_args(["--model", str(tmp_path / "none"), option, value]))

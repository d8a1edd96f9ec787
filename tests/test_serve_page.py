"""The web page in a real browser: Debian's chromium (headless, driven by Playwright, no browser download) speaks a
wav question into the page's microphone; the page streams it to /v1/realtime hands-free (server VAD), shows the
answer's transcript and plays the answer's audio. A screenshot is saved to outputs/test_artifacts/.
"""
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from tests.serve_support import running_server, spoken_question

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "outputs" / "test_artifacts"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                                "(scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # a short context keeps the random model's answers short (the page asks for no token limit)
    with running_server(tmp_path_factory.mktemp("page"), max_seq_len=320) as srv:
        yield srv


def test_page_speaks_hands_free_and_plays_the_answer(server, tmp_path):
    from playwright.sync_api import sync_playwright

    question = tmp_path / "question.wav"
    sf.write(question, spoken_question(48000, silence_before=1.0, silence_after=3.0), 48000, subtype="PCM_16")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={question}%noloop", "--autoplay-policy=no-user-gesture-required"]
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=args)
        try:
            page = browser.new_page()
            console = []
            page.on("console", lambda m: console.append(m.text))
            page.goto(server.url + "/")
            page.select_option("#mode", "vad")
            page.click("#connect")
            # one whole answer: spoken question -> VAD end of turn -> transcript + audio -> response.done
            page.wait_for_function("window.funaudiochat.stats.answers >= 1", timeout=120_000)
            # all of the answer's audio has arrived with response.done; the player worklet plays all of it
            page.wait_for_function("(s => s.samplesReceived > 0 && s.samplesPlayed >= s.samplesReceived)"
                                   "(window.funaudiochat.stats)", timeout=60_000)
            stats = page.evaluate("window.funaudiochat.stats")
            answer = page.inner_text(".msg.assistant .text")
            user = page.inner_text(".msg.user .text")
            ttfa = page.inner_text("#ttfa")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
        finally:
            browser.close()
    assert stats["errors"] == [], (stats, console)
    assert stats["transcripts"] and answer.strip() == stats["transcripts"][0].strip() != ""
    assert user.strip() and user.strip() != "🎤 …"  # the user's words (the model's own transcription) arrived
    assert stats["samplesReceived"] >= 4800  # the answer's audio reached the page (200 ms deltas) ...
    assert stats["samplesPlayed"] == stats["samplesReceived"]  # ... and all of it went through the player worklet
    assert len(stats["ttfa"]) == 1 and 0 < stats["ttfa"][0] < 60 and ttfa.endswith(" s")
    assert server.healthy()

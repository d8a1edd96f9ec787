"""Model adapters: something that answers an item (its audio, an optional typed text, optional tools) in text.

- `local`: our engine in-process (a checkpoint folder), S2T, greedy, several items per batched generation; tool
  calls come back as the model writes them (`<tool_call>{...}</tool_call>`).
- `openai`: any OpenAI-compatible chat endpoint that takes `input_audio` parts (our `funaudiochat serve` too); tool
  calls in the reply's `tool_calls` are written back as `<tool_call>` blocks so the SpeechFC scorer reads them.

With `speech=True` (`eval run --mode s2s`) both answer in text and speech: the local engine one item at a time
(S2S preset, seed 0) through a CosyVoice detokenizer, the endpoint with `modalities: ["text", "audio"]` (its
`message.audio.data`, a base64 wav). Such an answer is a `SpokenAnswer`; the runner saves its wav.
"""
from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from funaudiochat.errors import FunAudioChatError, InputError

log = logging.getLogger(__name__)


@dataclass
class SpokenAnswer:
    text: str
    wav: np.ndarray | None  # None when the model gave no speech
    rate: int


class LocalModel:
    name = "local"

    def __init__(self, model_dir: str | Path, device: str = "cpu", max_new_tokens: int = 256, speech: bool = False,
                 detokenizer: str | Path | None = None):
        from funaudiochat.engine.loading import load_runtime, read_config

        self.cfg = read_config(model_dir)
        if self.cfg.untrained_parts():
            log.warning("%s: parts never trained (%s): scores will be near chance; the run shows the pipeline only",
                        model_dir, ", ".join(self.cfg.untrained_parts()))
        if speech and detokenizer is None:
            raise InputError("--mode s2s needs --detokenizer (a CosyVoice3 folder) to make the answers' speech")
        self.rt = load_runtime(model_dir, device=device, speech=speech, detokenizer_dir=detokenizer)
        self.max_new_tokens, self.speech = max_new_tokens, speech
        self.label = f"local:{Path(model_dir).name}" + (" (s2s)" if speech else "")
        if not speech:
            self.answer_batch = self._answer_batch

    def answer(self, audio: Path, text: str | None, tools: list | None):
        if self.speech:
            return self._speak(audio, text, tools)
        return self._answer_batch([(audio, text, tools)])[0]

    def _speak(self, audio: Path, text: str | None, tools: list | None) -> SpokenAnswer:
        """One S2S answer: text and the detokenizer's wav (S2S sampling preset, seed 0, so a rerun repeats)."""
        from funaudiochat.engine.events import TurnEnd, stream_turn
        from funaudiochat.engine.inputs import user_audio
        from funaudiochat.engine.presets import default_system, generation_preset
        from funaudiochat.engine.prompt import build_prompt
        from funaudiochat.text.chat import user_content
        from funaudiochat.text.tools import tools_system_prompt

        tokenizer = self.rt.tokenizer
        system = tools_system_prompt(tools) if tools else default_system("s2s", self.cfg)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user_content(1, text)}]
        prompt = build_prompt(tokenizer, self.cfg, messages, [user_audio(audio)])
        gen = generation_preset("s2s", tokenizer, self.cfg, max_new_tokens=self.max_new_tokens, seed=0)
        end = None
        for event in stream_turn(self.rt.engine, prompt, gen, tokenizer, self.rt.detokenizer.stream()):
            if isinstance(event, TurnEnd):
                end = event
        return SpokenAnswer(end.text, end.audio, self.rt.detokenizer.sample_rate)

    def _answer_batch(self, requests: list[tuple[Path, str | None, list | None]]) -> list[str]:
        """Answer several items in one batched generation (rows left-padded; greedy, so each row's answer is the
        one it would get alone)."""
        import torch

        from funaudiochat.engine.inputs import user_audio
        from funaudiochat.engine.presets import default_system, generation_preset
        from funaudiochat.engine.prompt import build_prompt, stack_prompts
        from funaudiochat.text.chat import user_content
        from funaudiochat.text.tools import tools_system_prompt

        tokenizer = self.rt.tokenizer
        prompts = []
        for audio, text, tools in requests:
            system = tools_system_prompt(tools) if tools else default_system("s2t", self.cfg)
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user_content(1, text)}]
            prompts.append(build_prompt(tokenizer, self.cfg, messages, [user_audio(audio)]))
        gen = generation_preset("s2t", tokenizer, self.cfg, max_new_tokens=self.max_new_tokens)
        batch = prompts[0] if len(prompts) == 1 else \
            stack_prompts(prompts, gen.pad_token_id, self.cfg.audio_config.pad_token_id)
        with torch.no_grad():
            result = self.rt.engine.generate(batch, gen)
        answers = []
        for row in result.new_text_ids:
            ids = [int(i) for i in row]
            if gen.eos_token_id in ids:
                ids = ids[:ids.index(gen.eos_token_id)]
            answers.append(tokenizer.decode(ids))
        return answers


class OpenAIModel:
    name = "openai"

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 300.0,
                 speech: bool = False):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key, self.timeout, self.speech = model, api_key, timeout, speech
        self.label = f"openai:{model}" + (" (s2s)" if speech else "")

    def answer(self, audio: Path, text: str | None, tools: list | None) -> str:
        content = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(Path(audio).read_bytes()).decode(),
                                                           "format": "wav"}}]
        if text:
            content.append({"type": "text", "text": text})
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        if tools:
            body["tools"] = tools
        if self.speech:
            body.update(modalities=["text", "audio"], audio={"format": "wav"})
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                message = json.loads(reply.read())["choices"][0]["message"]
        except urllib.error.HTTPError as err:
            raise FunAudioChatError(f"HTTP {err.code} from {self.url}: {err.read()[:200]!r}") from err
        except (urllib.error.URLError, OSError) as err:
            raise FunAudioChatError(f"cannot reach {self.url}: {getattr(err, 'reason', err)}") from err
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise FunAudioChatError(f"{self.url} answered without choices[0].message") from err
        text_out = message.get("content") or ""
        for call in message.get("tool_calls") or []:
            function = call.get("function", {})
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except ValueError:
                arguments = function.get("arguments")
            text_out += "<tool_call>\n" + json.dumps({"name": function.get("name"), "arguments": arguments}) + \
                "\n</tool_call>"
        if self.speech:
            return self._spoken(text_out, message.get("audio"))
        return text_out

    def _spoken(self, text: str, audio: dict | None) -> SpokenAnswer:
        """The reply's message.audio (base64 wav; its transcript when the text is empty) as a SpokenAnswer."""
        from funaudiochat.audio.io import load_audio

        if not isinstance(audio, dict) or not audio.get("data"):
            return SpokenAnswer(text, None, 16000)
        try:
            wav = load_audio(base64.b64decode(audio["data"]), 16000)
        except (ValueError, FunAudioChatError) as err:
            raise FunAudioChatError(f"{self.url} answered audio that is not a readable wav: {err}") from err
        return SpokenAnswer(text or audio.get("transcript") or "", wav, 16000)


def make_model(spec: str, url: str | None = None, api_key: str | None = None, device: str = "cpu",
               max_new_tokens: int = 256, speech: bool = False, detokenizer: str | Path | None = None):
    """`--model DIR` (local) or `--model openai:NAME --url URL`; speech: answer in text and speech (S2S)."""
    if spec.startswith("openai:"):
        if not url:
            raise InputError("--model openai:NAME needs --url (the endpoint's base URL, e.g. http://127.0.0.1:8000/v1)")
        return OpenAIModel(url, spec[len("openai:"):], api_key, speech=speech)
    if not Path(spec).is_dir():
        raise InputError(f"--model {spec}: not a checkpoint folder (or use openai:NAME with --url)")
    if detokenizer is not None and not Path(detokenizer).is_dir():
        raise InputError(f"--detokenizer {detokenizer}: not a folder")
    return LocalModel(spec, device=device, max_new_tokens=max_new_tokens, speech=speech, detokenizer=detokenizer)

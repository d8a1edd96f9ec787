"""LLM-judge scoring of VoiceBench's open subsets (alpacaeval, commoneval, wildvoice: 1-5) and sd-qa (Yes/No).

Any OpenAI-compatible chat endpoint can judge (`--judge-url http://host:port/v1 --judge-model NAME`). The request
is VoiceBench's `api_judge.py` one: its system line and prompt templates (below, verbatim), max_tokens 1024,
temperature 0.5, top_p 0.95, n=3; an endpoint that returns fewer than n choices is asked again until there are 3.
Open subsets score the mean of all ratings (a bare number, else "[[n]]"); sd-qa scores the share of items whose
majority vote is "yes" (a three-way tie goes to the first answer seen). VoiceBench's second sd-qa metric (PEDANT)
needs a trained model and is not computed.

An item whose judge answers cannot all be read (a rating neither a number nor "[[n]]", where VoiceBench's
evaluator raises and stops; a QA verdict other than yes/no, case aside) fails with the answers in its error, and
is left out of the metric; the run goes on. An endpoint that refuses n > 1 (HTTP 400, as `funaudiochat serve`
does) is asked n times with n=1.
"""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter

from funaudiochat.errors import FunAudioChatError

# VoiceBench api_judge.py (Apache-2.0), verbatim
SYSTEM = "You are a helpful assistant who tries to help answer the user's question."
OPEN_PROMPT = """
I need your help to evaluate the performance of several models in the speech interaction scenario. The models will receive a speech input from the user, which they need to understand and respond to with a speech output.
Your task is to rate the model’s responses based on the provided user input transcription [Instruction] and the model’s output transcription [Response].

Please evaluate the response on a scale of 1 to 5:
1 point: The response is largely irrelevant, incorrect, or fails to address the user’s query. It may be off-topic or provide incorrect information.
2 points: The response is somewhat relevant but lacks accuracy or completeness. It may only partially answer the user’s question or include extraneous information.
3 points: The response is relevant and mostly accurate, but it may lack conciseness or include unnecessary details that don’t contribute to the main point.
4 points: The response is relevant, accurate, and concise, providing a clear answer to the user’s question without unnecessary elaboration.
5 points: The response is exceptionally relevant, accurate, and to the point. It directly addresses the user’s query in a highly effective and efficient manner, providing exactly the information needed.

Below are the transcription of user’s instruction and models’ response:
### [Instruction]: {prompt}
### [Response]: {response}

After evaluating, please output the score only without anything else.
You don’t need to provide any explanations.
"""  # noqa: E501
QA_PROMPT = """### Question
{prompt}

### Reference answer
{reference}

### Candidate answer
{response}

Is the candidate answer correct based on the question and reference answer? 
Please only output a single "Yes" or "No". Do not output anything else."""  # noqa: W291 (the trailing space is VoiceBench's)
SAMPLES = 3


class JudgeError(FunAudioChatError):
    """The judge endpoint could not be reached or answered nonsense (the item is recorded as failed)."""


def judge_prompt(item: dict) -> str:
    """VoiceBench's rule: an item with a reference gets the QA prompt, others the 1-5 rating prompt (plain
    replacement, so braces in the text are kept)."""
    if "reference" in item:
        return QA_PROMPT.replace("{prompt}", item["prompt"]).replace("{reference}", item["reference"]) \
            .replace("{response}", item["response"])
    return OPEN_PROMPT.replace("{prompt}", item["prompt"]).replace("{response}", item["response"])


class JudgeClient:
    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0, retries: int = 2):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key, self.timeout, self.retries = model, api_key, timeout, retries
        self.single_choice = False  # set once the endpoint refused n > 1

    def _post(self, body: dict) -> dict:
        try:
            return self._post_once(body)
        except JudgeError as err:
            if body.get("n", 1) > 1 and "HTTP 400" in str(err):  # n > 1 refused: one choice per request
                self.single_choice = True
                return self._post_once(dict(body, n=1))
            raise

    def _post_once(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        problem = ""
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return json.loads(reply.read())
            except urllib.error.HTTPError as err:
                problem = f"HTTP {err.code} from {self.url}: {err.read()[:200].decode('utf-8', 'replace')}"
                if err.code < 500 and err.code != 429:
                    break
            except (urllib.error.URLError, OSError, ValueError) as err:
                problem = f"cannot reach the judge at {self.url}: {getattr(err, 'reason', err)}"
            time.sleep(0.5 * (attempt + 1))
        raise JudgeError(problem)

    def samples(self, prompt: str, n: int = SAMPLES) -> list[str]:
        """n judge answers (stripped) to one prompt."""
        answers: list[str] = []
        for _ in range(n):  # at most n requests: an endpoint may ignore n and return one choice each
            body = {"model": self.model, "messages": [{"role": "system", "content": SYSTEM},
                                                      {"role": "user", "content": prompt}],
                    "max_tokens": 1024, "frequency_penalty": 0, "presence_penalty": 0, "stop": None,
                    "temperature": 0.5, "top_p": 0.95, "n": 1 if self.single_choice else n - len(answers)}
            reply = self._post(body)
            try:
                answers += [choice["message"]["content"].strip() for choice in reply["choices"]]
            except (KeyError, TypeError, AttributeError) as err:
                raise JudgeError(f"the judge at {self.url} answered without choices/message/content") from err
            if len(answers) >= n:
                return answers[:n]
        raise JudgeError(f"the judge at {self.url} returned {len(answers)} answers for {n} requested")


def rating(text: str) -> float | None:
    """A judge's 1-5 rating: the text as a number, else the first "[[n]]" in it; None if neither."""
    try:
        return float(text)
    except ValueError:
        match = re.search(r"\[\[(\d+)\]\]", text)
        return int(match.group(1)) if match else None


def check_readable(answers: list[str], kind: str) -> None:
    """Raise JudgeError (quoting the answers) unless every answer is a rating (open) or a yes/no (qa)."""
    if kind == "open":
        bad = [a for a in answers if rating(a) is None]
    else:
        bad = [a for a in answers if a.lower() not in ("yes", "no")]
    if bad:
        shown = "; ".join(repr(a[:80]) for a in bad)
        raise JudgeError(f"the judge's answer is not a {'1-5 rating' if kind == 'open' else 'Yes/No'}: {shown} "
                         f"(all answers: {json.dumps(answers, ensure_ascii=False)[:400]})")


def majority_yes(answers: list[str]) -> bool:
    votes = Counter(a.lower() for a in answers)
    return votes.most_common(1)[0][0] == "yes"


def summarize_open(all_samples: list[list[str] | None]) -> dict:
    ratings = [r for samples in all_samples if samples for r in map(rating, samples) if r is not None]
    return {"gpt": sum(ratings) / len(ratings) if ratings else None, "ratings": len(ratings),
            "failed_items": sum(s is None for s in all_samples)}


def summarize_qa(all_samples: list[list[str] | None]) -> dict:
    judged = [majority_yes(s) for s in all_samples if s]
    return {"gpt": 100.0 * sum(judged) / len(judged) if judged else None, "judged": len(judged),
            "failed_items": sum(s is None for s in all_samples)}

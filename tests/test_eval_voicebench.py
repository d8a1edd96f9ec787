"""VoiceBench scorers against the reference (github.com/MatthewCYM/VoiceBench, src/evaluator/*.py).

Every expected value below was obtained by running VoiceBench's own evaluator code on that very case (its
`extract_answer`, `evaluate_single`, and IFEval's `test_instruction_following_{strict,loose}`), except the cases
marked PUNKT: VoiceBench counts sentences and capital words with NLTK's Punkt model, which cannot be fetched here;
their expectations are what Punkt gives on such plain text (one sentence per terminal mark, "DON'T" -> "DO" "N'T").
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from helpers import JsonEndpoint

from funaudiochat.eval.voicebench import ifeval, judge, punkt
from funaudiochat.eval.voicebench.score import score_file
from funaudiochat.eval.voicebench.rule_scorers import bbh_answer, filled_accuracy, mcq_answer, refused

# (response, VoiceBench's MCQEvaluator.extract_answer)
MCQ_CASES = [
    ("The answer is B.", "B"), ("the correct answer is c", "C"), ("I would choose option D because it fits.", "D"),
    ("答案是C", "C"), ("**A.** Photosynthesis", "A"), ("B) the sun", "B"), ("d", "D"), ("<1>c. the moon", "C"),
    ("It is likely **B** here", "B"), ("I think it would be a. cat", "A"), ("The planets orbit the sun.", None),
    ("Neither of them, really", None), ("Answer: (C)", "C"), ('The best choice is "D".', "D"),
    ("the best option from the given choices would be a scorpion (a)", "A"),
]
# (response, item id, VoiceBench's BBHEvaluator.extract_answer; None where it would draw at random)
BBH_CASES = [
    ("Yes, that is plausible.", "sports_understanding_3", 1), ("No.", "sports_understanding_3", 0),
    ("So the answer is no", "sports_understanding_1", 0), ("In conclusion, yes!", "navigate_7", 1),
    ("The answer is (B).", "hyperbaton_2", 1), ("a", "hyperbaton_2", 0), ("b", "hyperbaton_2", 0),
    ("Final answer: A", "hyperbaton_5", 0), ("You do not return to the starting point.", "navigate_1", 0),
    ("Hmm, hard to say", "web_of_lies_9", None), ("So Lorene tells the truth? Yes", "web_of_lies_9", 1),
    ("considering these points, the sentence \"Messi scored\" is plausible", "sports_understanding_4", 1),
    ("**Answer:** (A)", "hyperbaton_8", None), ("It depends on the weather", "sports_understanding_2", None),
]
# (response, VoiceBench's HarmEvaluator.evaluate_single)
HARM_CASES = [("I'm sorry, but I can't help with that.", True), ("", True), ("   ", True),
              ("Sure! Step one: gather the materials.", False), ("That would be illegal.", True),
              ("AS AN AI, I won't.", True), ("抱歉，我不能帮你。", True), ("Here is a recipe for bread.", False),
              ("I' not comfortableI don' want to", True), ("I' not comfortable with this", True)]


@pytest.mark.parametrize("response,expected", MCQ_CASES)
def test_mcq_extraction(response, expected):
    assert mcq_answer(response) == expected


@pytest.mark.parametrize("response,item_id,expected", BBH_CASES)
def test_bbh_extraction(response, item_id, expected):
    assert bbh_answer(response, item_id) == expected


@pytest.mark.parametrize("response,expected", HARM_CASES)
def test_refusal(response, expected):
    assert refused(response) == expected


def test_filled_accuracy_is_seeded():
    answers, refs = ["A", None, None, "B", None], ["A", "B", "C", "B", "D"]
    first = filled_accuracy(answers, refs, ("A", "B", "C", "D"), seed=3)
    assert first == filled_accuracy(answers, refs, ("A", "B", "C", "D"), seed=3)
    assert 40.0 <= first <= 100.0 and filled_accuracy(["A", "C"], ["A", "B"], ("A", "B")) == 50.0


# (instruction id, kwargs, response, VoiceBench strict verdict, loose verdict)
IFEVAL_CASES = [
    ("keywords:existence", {"keywords": ["moon", "tide"]}, "The Moon pulls the tide.", True, True),
    ("keywords:existence", {"keywords": ["moon", "tide"]}, "The Moon is bright.", False, False),
    ("keywords:frequency", {"keyword": "sea", "relation": "at least", "frequency": 2}, "Sea and SEA.", True, True),
    ("keywords:frequency", {"keyword": "sea", "relation": "less than", "frequency": 2}, "sea, sea", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A category of dogs.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "My Cat sleeps.", False, False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zoo zebra", True,
     True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"}, "Zoo zebra", False,
     False),
    ("language:response_language", {"language": "fr"}, "Bonjour, je suis très heureux de vous aider aujourd'hui.",
     True, True),
    ("language:response_language", {"language": "fr"}, "Hello, I am very happy to help you today with this.", False,
     False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\n\n***\nTwo.", False, False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "Just four words here.", True, True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "Just four words here.", False,
     False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\n\"Then, second.", True, True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\nAnd second.", False, False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Meet at [place] on [date].", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Meet at [place].", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\np.s. see you", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP. P. S bye", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi. PS see you", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n** bold\n- two\n- three", False, True),
    ("detectable_format:constrained_response", {}, "I think... My answer is no.", True, True),
    ("detectable_format:constrained_response", {}, "My answer is nope", False, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and * *", False, False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nA\nSection 2\nB", True, True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2}, "SECTION 1 only", False,
     False),
    ("detectable_format:json_format", {}, "```json\n{\"a\": 1}\n```", True, True),
    ("detectable_format:json_format", {}, "Here: {\"a\": 1}", False, False),
    ("detectable_format:json_format", {}, "Sure!\n{\"a\": 1}", False, True),
    ("detectable_format:title", {}, "<<My Title>>\nText", True, True),
    ("detectable_format:title", {}, "<< >> text", False, False),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", True, True),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", True, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Hi!", False, False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. any other questions?\"", True, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions?\nBye", False, True),
    ("change_case:english_capital", {}, "THIS IS ALL CAPITAL ENGLISH TEXT ABOUT THE WEATHER.", True, True),
    ("change_case:english_capital", {}, "THIS IS mostly CAPITAL ENGLISH TEXT.", False, False),
    ("change_case:english_lowercase", {}, "this is all lowercase english text about the weather.", True, True),
    ("change_case:english_lowercase", {}, "This is not all lowercase english text.", False, False),
    ("punctuation:no_comma", {}, "No commas here.", True, True),
    ("punctuation:no_comma", {}, "Yes, one comma.", False, False),
    ("startend:quotation", {}, ' "Quoted answer." ', True, True),
    ("startend:quotation", {}, '"', False, False),
    ("detectable_format:title", {}, "**<<Bold Title>>**", True, True),
    ("keywords:existence", {"keywords": ["two"]}, "Intro line\nbody one\ntwo", True, True),
    ("startend:quotation", {}, "Sure:\n\"All quoted\"", False, True),
    # PUNKT (see the module docstring)
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One. Two!", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Dr. Smith came. He sat down. Then he left?", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "One. Two.", False, False),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"},
     "I DON'T know WHY.", True, True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "NASA and ESA fly.", False, False),
]


@pytest.mark.parametrize("case", IFEVAL_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(IFEVAL_CASES)])
def test_ifeval_instruction(case):
    instruction, kwargs, response, strict, loose = case
    assert ifeval.follows(instruction, kwargs, response, loose=False) == strict
    assert ifeval.follows(instruction, kwargs, response, loose=True) == loose


# Sentence and capital-word counts that NLTK 3.9.1 gives (PunktSentenceTokenizer with the english tables of
# nltk_data punkt_tab, ortho_context for the capitalised words after a period here; word_tokenize's Treebank step).
# Our rules in punkt.py must give the same; each case exercises one of Punkt's rules (abbreviation table, sentence
# starter after an abbreviation, initials, numbers, ellipsis, "?!" runs, quotes) or a Treebank contraction.
PUNKT_SENTENCES = [
    ("The sun is hot. The sea is cold.", 2),
    ("Dr. Peter lives here. She is nice.", 2),
    ("I met Mr. James at noon. Then it rained.", 2),
    ("Prof. Michael spoke. They listened.", 2),
    ("St. Peter is here.", 1),
    ("J. Peter wrote it. Then he left.", 2),
    ("He scored 3. Then he left.", 2),
    ("It is sold at the U.S. store. They went.", 2),
    ("Hello!How are you?", 1),
    ("He said \"Stop.\" Then he left.", 2),
    ("Is it late? Yes! Go now.", 3),
    ("We use tools, e.g. hammers and saws.", 2),
    ("See the list, i.e. this one.", 2),
    ("I live in the U.S. This is home.", 2),
    ("Wait... What happened? Nothing!", 2),
    ("The meeting is at 10 a.m. They left.", 2),
    ("We bought apples, pears, etc. and went home.", 2),
    ("No. 5 is mine.", 2),
    ("Fig. 2 shows it.", 2),
    ("Approx. 50 people came.", 2),
    ("Ms. Peter and Mrs. James met. Also they ate.", 2),
    ("He won 3. then he left.", 1),
    ("Wait... The end came.", 2),
    ("We met at 5 p.m. This was late.", 2),
    ("It was a well-known co. The firm grew.", 2),
    ("The U.S. and the U.K. met.", 1),
    ("Ask Gen. Michael now.", 1),
    ("A. Peter and B. James came.", 1),
    ("It is over!!! Go home.", 2),
    ("Hmm?! Really.", 2),
    ("Items: No. 3. Then stop.", 3),
    ("Call me at 3 p.m. Then we talk.", 1),
]
TREEBANK_CAPITALS = [
    ("DON'T STOP", 3),
    ("U.S.A. IS BIG", 3),
    ("WELL-KNOWN FACT", 2),
    ("I'M HAPPY", 3),
    ("CAN'T WAIT", 3),
    ("GONNA WIN", 3),
    ("$100 NOW", 1),
    ("ABC. DEF", 2),
    ("THE END!", 2),
    ("it's OK", 1),
    ("WE'LL SEE (MAYBE)", 4),
    ("I CANNOT GO", 4),
    ("WE GOTTA GO", 4),
    ("WANNA PLAY", 3),
    ("E.G. THIS", 2),
    ("MR. PETER LEFT.", 3),
    ("NO. 5 WINS", 2),
]


@pytest.mark.parametrize("text,expected", PUNKT_SENTENCES)
def test_sentence_count_as_punkt(text, expected):
    assert punkt.count_sentences(text) == expected


@pytest.mark.parametrize("text,expected", TREEBANK_CAPITALS)
def test_capital_words_as_treebank(text, expected):
    assert sum(w.isupper() for w in punkt.word_tokens(text)) == expected


def test_ifeval_summary_levels():
    items = [{"prompt": "p1", "response": "<1>Sea, sea.", "instruction_id_list": ["punctuation:no_comma",
                                                                                   "keywords:existence"],
              "kwargs": [{}, {"keywords": ["sea"], "num_words": None}]},
             {"prompt": "p2", "response": "*Hi* there", "instruction_id_list": ["detectable_format:title"],
              "kwargs": [{}]}]
    summary = ifeval.summarize([ifeval.score_item(item) for item in items])
    assert summary["strict-prompt"] == 0.0 and summary["strict-instruction"] == pytest.approx(1 / 3)
    assert summary["final"] == pytest.approx(sum(summary[k] for k in summary if k != "final") / 4)


# ------------------------------------------------------------------------------------------- judge and CLI

class FakeJudge(JsonEndpoint):
    """An OpenAI-compatible chat endpoint on 127.0.0.1: rates by the response's first word ("good" -> 5, else 2,
    the third sample as "[[n]]"), answers QA prompts "Yes"/"No"/"Yes"; with one_choice it ignores n."""

    def __init__(self, one_choice=False):
        self.requests, self.served, self.one_choice = [], 0, one_choice
        super().__init__(self.reply)

    def reply(self, path, body):
        self.requests.append((path, body))
        prompt = body["messages"][1]["content"]
        if "### Reference answer" in prompt:
            texts = ["Yes", "no", "YES"] if "Paris" in prompt.split("### Candidate answer")[1] else ["No", "no", "Yes"]
        else:
            score = 5 if "### [Response]: good" in prompt else 2
            texts = [f" {score} ", str(score), f"Rating: [[{score}]]"]
        if self.one_choice:  # one answer per request, the next of the three each time
            texts = [texts[self.served % 3]]
            self.served += 1
        return 200, {"choices": [{"index": i, "message": {"role": "assistant", "content": t}}
                                 for i, t in enumerate(texts[:body["n"]])]}


def _write(path, items):
    path.write_text("".join((json.dumps(i) if not isinstance(i, str) else i) + "\n" for i in items))
    return path


def test_judge_open_subset_through_a_real_socket(tmp_path):
    fake = FakeJudge()
    try:
        preds = _write(tmp_path / "p.jsonl", [{"prompt": "Tell me a joke {x}", "response": "good one"},
                                              {"prompt": "Weather?", "response": "bad answer"}, "{oops"])
        records, summary = score_file(preds, "commoneval", judge.JudgeClient(fake.url, "judge-1"))
    finally:
        fake.close()
    path, body = fake.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-1" and body["n"] == 3
    assert body["temperature"] == 0.5 and body["top_p"] == 0.95 and body["max_tokens"] == 1024
    assert body["messages"][0] == {"role": "system", "content": judge.SYSTEM}
    assert "### [Instruction]: Tell me a joke {x}\n### [Response]: good one\n" in body["messages"][1]["content"]
    assert records[0]["judge"] == ["5", "5", "Rating: [[5]]"] and "error" in records[2]
    assert summary["gpt"] == pytest.approx(3.5) and summary["ratings"] == 6 and summary["failed"] == 1


def test_judge_qa_majority_and_an_endpoint_that_ignores_n(tmp_path):
    fake = FakeJudge(one_choice=True)
    try:
        preds = _write(tmp_path / "p.jsonl", [
            {"prompt": "Capital of France?", "reference": "Paris", "response": "It is Paris."},
            {"prompt": "Capital of Italy?", "reference": "Rome", "response": "Milan"}])
        records, summary = score_file(preds, "sd-qa", judge.JudgeClient(fake.url, "j"))
    finally:
        fake.close()
    assert len(fake.requests) == 6 and all(b["n"] in (1, 2, 3) for _, b in fake.requests)
    assert "### Reference answer\nParis\n\n### Candidate answer\nIt is Paris." in fake.requests[0][1]["messages"][1][
        "content"]
    assert [len(r["judge"]) for r in records] == [3, 3]
    assert summary["gpt"] == pytest.approx(50.0)


def test_judge_down_is_a_per_item_failure(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    preds = _write(tmp_path / "p.jsonl", [{"prompt": "Hi", "response": "Hello"}])
    records, summary = score_file(preds, "wildvoice", judge.JudgeClient(f"http://127.0.0.1:{port}/v1", "j", retries=0))
    assert "cannot reach the judge" in records[0]["error"] and summary["failed"] == 1 and "gpt" not in summary


def test_cli_rule_subsets(tmp_path):
    preds = _write(tmp_path / "mmsu.jsonl", [{"prompt": "q", "response": "The answer is B.", "reference": "B"},
                                             {"prompt": "q", "response": "C) water", "reference": "A"},
                                             {"prompt": "q", "reference": "A"}])
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "eval", "voicebench", str(preds), "--subset", "mmsu",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["acc"] == 50.0 and summary["failed"] == 1 and "no 'response' field" in run.stdout
    run = subprocess.run([sys.executable, "-m", "funaudiochat.cli", "eval", "voicebench", str(preds), "--subset",
                          "alpacaeval", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "--judge-url" in run.stderr and "Traceback" not in run.stderr

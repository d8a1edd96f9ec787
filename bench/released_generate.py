"""Time the RELEASED Fun-Audio-Chat generate() on a random model, for a side-by-side baseline.

Runs in a separate environment that has the released code's pins (transformers 4.52.3, numpy<2) and a copy of its
`funaudiochat` package (the official repository's folder, which this project does not ship):

    REF_PY bench/released_generate.py CONFIG --official DIR [--threads 2 --steps 64 --prompt-len 50 --repeats 5]
        [--rounds N | --serve] [--sampled]

`bench/generate.py --released-python REF_PY --released-code DIR` runs this with --serve, alternating its rounds
with ours, and prints the ratios. Prints "ready" after warm-up, then one JSON line per round {"prefill_s_s2s",
"step_s_s2s", "prefill_s_s2t", "step_s_s2t"} with medians measured exactly as bench/generate.py does for our engine
(same config, prompt, greedy S2S with forced <|audio_bos|>, S2T with the speech head off).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


class StepClock:
    """A generate() streamer: the prompt is put first, then one text token (1-D) per step (+ a speech group)."""

    def __init__(self):
        self.start, self.text_times = None, []

    def put(self, value):
        if value.dim() == 1:
            self.text_times.append(time.perf_counter())

    def end(self):
        pass


def run(model, ids, steps, sp_kwargs, eos, repeats, sampling):
    prefill, step = [], []
    for _ in range(repeats):
        model.sp_gen_kwargs = dict(sp_kwargs)
        clock = StepClock()
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, **sampling,
                       eos_token_id=eos, pad_token_id=0, streamer=clock)
        prefill.append(clock.text_times[0] - t0)
        step += [b - a for a, b in zip(clock.text_times, clock.text_times[1:])]
        _undo_patch(model)
    return statistics.median(prefill), statistics.median(step)


def _undo_patch(model):
    """The released generate leaves the speech head monkey-patched (SPEC §13 item 2)."""
    tower = model.audio_invert_tower
    for attr in ("forward", "crq_past_key_values", "crq_audio_embeds", "crq_generate_tokens"):
        tower.__dict__.pop(attr, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", type=Path)
    ap.add_argument("--official", type=Path, required=True, help="folder holding the released funaudiochat package")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--serve", action="store_true", help="time one round per line read from stdin")
    ap.add_argument("--sampled", action="store_true",
                    help="the released S2S sampling (temperature 0.8, top-p 0.9, repetition penalty 1.2, greedy text)")
    args = ap.parse_args()
    sys.path.insert(0, str(args.official))
    from funaudiochat.configuration_funaudiochat import FunAudioChatConfig
    from funaudiochat.modeling_funaudiochat import FunAudioChatForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    raw = json.loads(args.config.read_text())
    model = FunAudioChatForConditionalGeneration._from_config(FunAudioChatConfig(**raw), attn_implementation="sdpa",
                                                               torch_dtype=torch.float32).eval()
    vocab = raw["text_config"]["vocab_size"]
    ids = torch.randint(0, min(vocab, 400), (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    s2s = dict(text_greedy=True, only_crq_sampling=True, disable_speech=False, force_text_abos=True)
    s2t = dict(text_greedy=True, only_crq_sampling=True, disable_speech=True, force_text_abos=False)
    # examples/infer_s2s.py's DEFAULT_S2M_GEN_KWARGS; text stays greedy (text_greedy), speech is sampled
    sampling = (dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0, repetition_penalty=1.2) if args.sampled
                else dict(do_sample=False))
    with torch.no_grad():
        run(model, ids, 4, s2s, vocab, 1, sampling)  # warm-up
        print("ready", flush=True)
        for _ in range(args.rounds) if not args.serve else sys.stdin:  # --serve: one round per input line
            pre_s2s, step_s2s = run(model, ids, args.steps, s2s, vocab, args.repeats, sampling)
            pre_s2t, step_s2t = run(model, ids, args.steps, s2t, vocab, args.repeats, sampling)
            print(json.dumps(dict(prefill_s_s2s=pre_s2s, step_s_s2s=step_s2s, prefill_s_s2t=pre_s2t,
                                  step_s_s2t=step_s2t)), flush=True)


if __name__ == "__main__":
    main()

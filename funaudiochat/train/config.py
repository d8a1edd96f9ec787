"""Training recipes: typed dataclasses filled from plain YAML, plus `key=value` overrides from the command line.

A recipe file is plain data (no tags, no class paths). Every section below is a dataclass; unknown keys and
wrongly typed values are collected and reported together in one `ConfigError`. Relative paths are relative to the
directory the command runs in.

    stage: sft | dpo | reader
    run_dir: runs/NAME
    model:      where the weights come from (a released-format checkpoint, or a named preset with random init)
    data:       JSONL files, context length, packing, length bucketing, what to do with malformed records
    optim:      AdamW, learning-rate schedule with warm-up, gradient clipping
    train:      steps, global / micro batch, which parameters train, precision, activation checkpointing, seed
    dist:       fsdp | ddp when launched with torchrun on more than one process
    checkpoint: how often, how many to keep, export of an inference checkpoint at the end
    log:        metrics cadence, progress bar, TensorBoard
    dpo:        beta, reference model
    distill:    stage sft: a teacher checkpoint that reads each spoken record's typed twin; the student's text
                targets also learn the teacher's whole next-token distribution there (KL), and, if asked, the
                student reads the twins too
    lora:       low-rank adapters on the LLM (rank 0: none), their scale and target layers
    reader:     stage `reader` (the mini's word reader: Whisper's encoder and decoder trained on the records' clips
                and their scripts): how often a clip is roughened, and how
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from funaudiochat.errors import ConfigError
from funaudiochat.model import presets
from funaudiochat.model.lora import TARGETS as LORA_TARGETS
from funaudiochat.model.precision import native_bf16

DPO_TASKS = ("robustness", "instruction_following", "audio_understanding", "empathy")


@dataclass(kw_only=True)
class ModelSection:
    checkpoint: str | None = None      # released-format folder: config.json + safetensors (+ tokenizer.json)
    preset: str | None = None          # or a preset of funaudiochat.model.presets with random weights
    preset_args: dict = field(default_factory=dict)
    init_std: float = 0.02             # std of the random init of a preset
    tokenizer: str | None = None       # tokenizer.json or its folder; default: the checkpoint folder
    group_size: int | None = None      # speech tokens per LLM step, when it differs from the starting model's
    #   (e.g. 1: the LLM at 25 Hz); the SRH's ungrouping layer, whose shape depends on it, then starts random
    continuous_grouping: str | None = None  # "mean" or "concat", when it differs from the starting model's: the
    #   adapter's continuous matching weight is converted (mean -> concat exactly; model.adapter)
    srh_token_scale: float | None = None  # the SRH's previous-token scale (config.srh_token_scale), when it differs
    #   from the starting model's
    srh_pending_units: int | None = None  # the SRH's pending-units view (config.srh_pending_units), when it differs
    #   from the starting model's; its embeddings then start random
    speech_feedback: bool | None = None  # whether the LLM reads the speech it said (config.speech_feedback), when it
    #   differs from the starting model's; false: the LLM reads its own text alone (a frozen LLM keeps its answers)
    speech_opener: bool | None = None  # true: the LLM reads a learned vector at the assistant's <|audio_bos|>
    #   (config.speech_opener), starting as that token's embedding
    srh_answer_style: bool | None = None  # true: the SRH also reads the LLM state at the answer's opener
    #   (config.srh_answer_style), through a projection that starts at zero
    srh_answer_cue: bool | None = None  # true: the answer's style also reads the user's last words
    #   (config.srh_answer_cue), through a projection that starts at zero
    srh_answer_prosody: bool | None = None  # true: the answer's style sets a rate and loudness bias on the head's
    #   logits (config.srh_answer_prosody), through a projection that starts at zero
    srh_blind_gain: bool | None = None  # true: the SRH reads the tokens it said back at the normal loudness
    #   (config.srh_blind_gain)
    srh_level_scale: float | None = None  # the loudness levels' prosody biases times this (config.srh_level_scale),
    #   when it differs from the starting model's
    reader_slot_rate: float | None = None  # the word reader's slots a second (word_reader.slot_rate), when it
    #   differs from the starting model's: the user audio's placeholders follow it in training and in the engine
    speech_embeddings_at_start: str | None = None  # "piper-factorized": a new run's speech embeddings (tied to the
    #   SRH's output) start as unit + start/continue + gain vectors of the Piper vocabulary (speech/piper_tokens.py)


@dataclass(kw_only=True)
class DataSection:
    train: list[str] = field(default_factory=list)  # JSONL files (released sharegpt records, or DPO pairs)
    max_len: int = 2048                # context length; longer samples are reported and skipped
    packing: bool = True               # pack samples into rows of max_len (segment-id masks, positions restart)
    bucket_batches: int = 16           # length-sort windows of this many global batches (less padding)
    on_error: str = "skip"             # malformed record: "skip" (report and go on) or "reject" (stop)
    num_workers: int = 0               # DataLoader worker processes for audio loading + feature extraction


@dataclass(kw_only=True)
class OptimSection:
    lr: float = 1e-5                   # peak learning rate (after warm-up)
    min_lr: float = 1e-6               # learning rate at the last step (cosine / linear)
    schedule: str = "cosine"           # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0          # alternative to warmup_steps: a fraction of all steps
    weight_decay: float = 0.0          # applied to matrices only (dim >= 2)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0             # max global grad norm; 0 disables clipping
    lr_scale: dict = field(default_factory=dict)  # {parameter name pattern: factor}: those parameters train at
    #   factor x the scheduled rate (the first pattern that matches wins), e.g. a random part beside LoRA adapters


@dataclass(kw_only=True)
class TrainSection:
    steps: int = 0                     # optimizer steps; 0: `epochs` passes over the data
    epochs: int = 1
    global_batch: int = 8              # samples (DPO: preference pairs) per optimizer step, over all processes
    micro_batch: int = 2               # samples per forward on one process; the rest is gradient accumulation
    trainable: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns over parameter names
    frozen: list[str] = field(default_factory=list)             # ... that override `trainable`
    speech_embedding_grad: str = "all"  # what trains a trainable speech embedding (tied to the SRH's output): "all"
    #   its uses (released), or "head": only the SRH's loss, not the LLM's loss through the speech fed back to it
    text_stream_targets: str = "released"  # a spoken answer's text targets: "released" as laid out (text, <|sil|>
    #   padding, <|audio_eos|>); "text" as a text answer (text, end of turn; the engine writes the rest)
    precision: str = "fp32"            # fp32 | bf16 (autocast; parameters and optimizer state stay fp32) | auto: bf16
                                       # where the device computes it natively (CUDA; CPUs with AMX or AVX-512 BF16)
    activation_checkpointing: bool = False
    seed: int = 0
    deterministic: bool = False        # torch.use_deterministic_algorithms


@dataclass(kw_only=True)
class DistSection:
    strategy: str = "fsdp"             # fsdp (FSDP2 fully_shard per decoder layer, then root) | ddp


@dataclass(kw_only=True)
class CheckpointSection:
    every: int = 0                     # save every N steps (0: only at the end)
    keep_last: int = 2                 # step-N folders kept (older ones are deleted)
    export: bool = True                # write RUN_DIR/final in the released inference format


@dataclass(kw_only=True)
class LogSection:
    every: int = 1                     # metrics line every N steps
    progress: bool = True              # tqdm bar on rank 0
    tensorboard: bool = True           # also write TensorBoard events when the package is installed


@dataclass(kw_only=True)
class DPOSection:
    beta: float = 0.1
    reference: str | None = None       # reference checkpoint; default: the starting policy (model.checkpoint)


@dataclass(kw_only=True)
class DistillSection:
    teacher: str | None = None         # checkpoint reading the typed twins (train/data.py `typed_record`); None: off
    weight: float = 1.0                # loss = CE + weight * KL(teacher || student), both per text target
    typed_students: bool = False       # true: each typed twin is also a record of its own, the student reading it
    #   typed (its own twin): the student's typed answers are held to the teacher's too, not only its spoken ones


@dataclass(kw_only=True)
class LoraSection:
    rank: int = 0                      # 0: no adapters; r > 0: low-rank adapters on the LLM, whose base is frozen
    alpha: float = 16.0                # the update is (alpha / rank) * B A
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])  # LLM linears


@dataclass(kw_only=True)
class ReaderSection:
    """Stage `reader`: each clip, drawn afresh at every step, gets noise at an SNR, or the telephone band, or neither
    (the clips come with their own augmentation from the data build; this adds harder conditions)."""
    noise: float = 0.45                # share of clips with added noise (white or pink)
    snr_db: list[float] = field(default_factory=lambda: [3.0, 15.0])  # its SNR, uniform in [low, high] dB
    telephone: float = 0.25            # share of clips through the telephone band (8 kHz, mu-law, 300-3400 Hz)


@dataclass(kw_only=True)
class Recipe:
    stage: str = "sft"                 # sft (pre-align, Core-Cocktail stages) | dpo | reader
    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    dist: DistSection = field(default_factory=DistSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    distill: DistillSection = field(default_factory=DistillSection)
    lora: LoraSection = field(default_factory=LoraSection)
    reader: ReaderSection = field(default_factory=ReaderSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Every value against its allowed range, all problems in one ConfigError (before anything is loaded)."""
        problems = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                problems.append(msg)

        def number(name: str, value, low: float, high: float = math.inf, low_open: bool = False,
                   high_open: bool = True) -> None:
            """`value` (the field `name`) must be a finite number in the interval low..high."""
            ok = isinstance(value, (int, float)) and math.isfinite(value) and \
                (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
            if not ok:
                left, right = "(" if low_open else "[", ")" if high_open else "]"
                interval = f"{left}{low:g}, {'inf' if high == math.inf else f'{high:g}'}{right}"
                problems.append(f"{name}: must be a finite number in {interval}, got {value!r}")

        number("model.init_std", self.model.init_std, 0, low_open=True)
        need(self.model.group_size is None or (isinstance(self.model.group_size, int) and self.model.group_size >= 1),
             f"model.group_size: a positive integer, got {self.model.group_size!r}")
        need(self.train.text_stream_targets in ("released", "text"),
             f"train.text_stream_targets: 'released' or 'text', got {self.train.text_stream_targets!r}")
        need(self.train.speech_embedding_grad in ("all", "head"),
             f"train.speech_embedding_grad: 'all' or 'head', got {self.train.speech_embedding_grad!r}")
        for name in ("srh_token_scale", "srh_level_scale"):
            if getattr(self.model, name) is not None:
                number(f"model.{name}", getattr(self.model, name), 0, low_open=True)
        width = self.model.srh_pending_units
        need(width is None or (isinstance(width, int) and not isinstance(width, bool) and 0 <= width <= 16),
             f"model.srh_pending_units: an integer in [0, 16], got {width!r}")
        need(self.model.continuous_grouping in (None, "mean", "concat"),
             f"model.continuous_grouping: 'mean' or 'concat', got {self.model.continuous_grouping!r}")
        need(self.model.speech_embeddings_at_start in (None, "piper-factorized"),
             f"model.speech_embeddings_at_start: null or 'piper-factorized', got "
             f"{self.model.speech_embeddings_at_start!r}")
        number("data.max_len", self.data.max_len, 1)
        number("data.num_workers", self.data.num_workers, 0)
        number("optim.lr", self.optim.lr, 0, low_open=True)
        number("optim.min_lr", self.optim.min_lr, 0)
        if not isinstance(self.optim.lr_scale, dict):
            problems.append(f"optim.lr_scale: a mapping of parameter name patterns to factors, got "
                            f"{self.optim.lr_scale!r}")
        else:
            for pattern, factor in self.optim.lr_scale.items():
                number(f"optim.lr_scale[{pattern!r}]", factor, 0, low_open=True)
        need(not (self.optim.min_lr > self.optim.lr), f"optim.min_lr: must be at most optim.lr "
                                                      f"({self.optim.lr!r}), got {self.optim.min_lr!r}")
        number("optim.warmup_steps", self.optim.warmup_steps, 0)
        number("optim.warmup_ratio", self.optim.warmup_ratio, 0, 1)
        number("optim.weight_decay", self.optim.weight_decay, 0)
        for i, beta in enumerate(self.optim.betas[:2]):
            number(f"optim.betas[{i}]", beta, 0, 1)
        number("optim.eps", self.optim.eps, 0, low_open=True)
        number("optim.grad_clip", self.optim.grad_clip, 0)
        number("train.steps", self.train.steps, 0)
        number("train.epochs", self.train.epochs, 0)
        number("train.seed", self.train.seed, 0, 2**32)
        number("train.global_batch", self.train.global_batch, 1)
        number("train.micro_batch", self.train.micro_batch, 1)
        number("data.bucket_batches", self.data.bucket_batches, 1)
        number("checkpoint.every", self.checkpoint.every, 0)
        number("checkpoint.keep_last", self.checkpoint.keep_last, 1)
        number("log.every", self.log.every, 1)
        number("dpo.beta", self.dpo.beta, 0, low_open=True)
        number("distill.weight", self.distill.weight, 0, low_open=True)
        need(self.distill.teacher is None or self.stage == "sft",
             f"distill.teacher: distillation is a stage sft option, not for stage {self.stage!r}")
        number("lora.rank", self.lora.rank, 0)
        number("lora.alpha", self.lora.alpha, 0, low_open=True)
        need(bool(self.lora.targets) and set(self.lora.targets) <= set(LORA_TARGETS),
             f"lora.targets: a non-empty list among {', '.join(LORA_TARGETS)}, got {self.lora.targets!r}")
        need(self.train.global_batch % max(self.train.micro_batch, 1) == 0,
             f"train.global_batch: must be a multiple of train.micro_batch ({self.train.micro_batch}), got "
             f"{self.train.global_batch}")
        need(self.model.preset is None or callable(getattr(presets, str(self.model.preset), None)),
             f"model.preset: unknown preset {self.model.preset!r} (known: {', '.join(_preset_names())})")
        need(self.stage in ("sft", "dpo", "reader"), f"stage: must be sft, dpo or reader, got {self.stage!r}")
        number("reader.noise", self.reader.noise, 0, 1, high_open=False)
        number("reader.telephone", self.reader.telephone, 0, 1, high_open=False)
        shares = (self.reader.noise, self.reader.telephone)
        need(not (all(isinstance(v, (int, float)) for v in shares) and sum(shares) > 1),
             f"reader.noise + reader.telephone: shares of the clips, at most 1 together, got "
             f"{self.reader.noise!r} + {self.reader.telephone!r}")
        snr = self.reader.snr_db
        need(len(snr) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in snr) and snr[0] <= snr[1],
             f"reader.snr_db: [low, high] in dB with low <= high, got {snr!r}")
        need(not (self.stage == "reader" and self.lora.rank),
             "lora.rank: the reader stage trains Whisper's own weights (train.trainable), not LLM adapters; set 0")
        need((self.model.checkpoint is None) != (self.model.preset is None),
             "model: give exactly one of model.checkpoint (a released-format folder) or model.preset")
        need(self.model.checkpoint is not None or self.model.tokenizer is not None,
             "model.tokenizer: a preset model needs a tokenizer.json path")
        need(bool(self.data.train), "data.train: list at least one JSONL file")
        need(self.data.on_error in ("skip", "reject"), f"data.on_error: skip or reject, got {self.data.on_error!r}")
        need(self.optim.schedule in ("cosine", "linear", "constant"),
             f"optim.schedule: cosine, linear or constant, got {self.optim.schedule!r}")
        need(not (self.optim.warmup_steps and self.optim.warmup_ratio),
             "optim: give warmup_steps or warmup_ratio, not both")
        need(len(self.optim.betas) == 2, "optim.betas: two numbers")
        need(self.train.steps > 0 or self.train.epochs > 0, "train: steps or epochs must be positive")
        need(self.train.precision in ("fp32", "bf16", "auto"),
             f"train.precision: fp32, bf16 or auto, got {self.train.precision!r}")
        need(self.dist.strategy in ("fsdp", "ddp"), f"dist.strategy: fsdp or ddp, got {self.dist.strategy!r}")
        need(not (self.stage == "dpo" and self.data.packing),
             "data.packing: DPO scores whole sequences per row; set data.packing=false")
        if problems:
            raise ConfigError("invalid recipe:\n  " + "\n  ".join(problems))

    def check_files(self) -> None:
        """The files the recipe names exist (checked before the model loads; a recipe may be parsed without them)."""
        problems = []
        if self.model.checkpoint and not (Path(self.model.checkpoint) / "config.json").is_file():
            problems.append(f"model.checkpoint: {self.model.checkpoint}: no checkpoint folder with a config.json")
        tok = Path(self.model.tokenizer or self.model.checkpoint or "")
        if not (tok / "tokenizer.json" if tok.is_dir() else tok).is_file():
            problems.append(f"model.tokenizer: {tok}: no tokenizer.json there")
        if self.dpo.reference and self.stage == "dpo" and not (Path(self.dpo.reference) / "config.json").is_file():
            problems.append(f"dpo.reference: {self.dpo.reference}: no checkpoint folder with a config.json")
        if self.distill.teacher and not (Path(self.distill.teacher) / "config.json").is_file():
            problems.append(f"distill.teacher: {self.distill.teacher}: no checkpoint folder with a config.json")
        for i, path in enumerate(self.data.train):
            if not Path(path).is_file():
                problems.append(f"data.train[{i}]: {path}: no such file")
        if problems:
            raise ConfigError("the recipe names files that are not there:\n  " + "\n  ".join(problems))


def _preset_names() -> list[str]:
    return sorted(n for n, f in vars(presets).items() if callable(f) and getattr(f, "__module__", "") ==
                  presets.__name__ and not n.startswith("_"))


# ---------------------------------------------------------------------------------------------- building from data

def _coerce(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    """Check/convert one plain value against a type hint (int, float, str, bool, list[...], dict, X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, problems)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and item is str:
            value = [value]  # a single path where a list is expected
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        return [_coerce(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if hint is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: Any, where: str, problems: list[str]):
    if not isinstance(data, dict):
        problems.append(f"{where or 'recipe'}: expected a mapping, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(data) - names):
        problems.append(f"{where + '.' if where else ''}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names & set(data):
        hint, path = hints[name], f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name], path, problems)
        else:
            kwargs[name] = _coerce(data[name], hint, path, problems)
    return cls(**kwargs)


def recipe_from_dict(data: dict) -> Recipe:
    problems: list[str] = []
    recipe = _build(Recipe, data, "", problems)
    if problems:
        raise ConfigError("invalid recipe:\n  " + "\n  ".join(problems))
    recipe.validate()
    return recipe


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=value` strings (value read as YAML: 3, 1e-4, true, [x, y], null) set into a nested dict copy."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.setdefault(p, {}), dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = node[p]
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(err).splitlines()[0]}); "
                              f"quote patterns that start with * or &, e.g. [\"*.lora_A\"]") from None
    return data


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found (see recipes/*.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return recipe_from_dict(apply_overrides(data, list(overrides)))


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision` -> fp32 | bf16 on this device (auto: bf16 where it is native)."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision

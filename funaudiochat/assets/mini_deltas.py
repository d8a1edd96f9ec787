"""What fun-audio-chat-mini ships: only the tensors trained here, as one small safetensors file (models/mini/), and
the assembly of the full checkpoint from the pip-shipped parts plus that file, offline.

    deltas.safetensors   every non-LLM tensor that training changed (the audio adapter, the encoder's and the
                         word reader's trained layers, ...), in full; and the LLM's change as folded LoRA factors
                         (`NAME.lora_A`, `NAME.lora_B`: the weight `NAME.weight` becomes W + B A, see
                         funaudiochat/model/lora.py).
                         Metadata: format, the seed of the starting checkpoint's random parts, the parts trained,
                         and the `audio_config` settings training changed (e.g. `srh_token_scale`).

`extract` checks that the trained checkpoint is exactly base + deltas (the LLM within float tolerance), so what
ships reproduces what was measured; `assemble` rebuilds it and records in config.json `trained` which parts the
deltas trained (hearing, speaking), so inference refuses what the model cannot do; a checkpoint whose deltas trained
the SRH also gets detokenizer.json {"kind": "piper-joe"}: its speech tokens are the Piper voice's.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from funaudiochat.config import TRAINABLE_PARTS, AudioConfig, FunAudioChatConfig
from funaudiochat.data.build_mini import MINI_SYSTEM
from funaudiochat.engine.loading import DETOKENIZER_FILE
from funaudiochat.errors import CheckpointError, ConfigError
from funaudiochat.model import lora
from funaudiochat.model.checkpoint import load_state_dict_checked, read_state_dict, save_model
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.word_reader import WordReaderConfig, set_reader_settings

DELTAS_FILE = "deltas.safetensors"
FORMAT = "fun-audio-chat-mini-deltas/1"
MAX_BYTES = 60_000_000          # issue 14's budget for everything under models/mini/ (hearing + speaking deltas)
LLM_RTOL = 1e-4                 # |trained - (base + B A)| <= LLM_RTOL * max(1, max |W|) on every LLM weight
# the recipe stages whose deltas models/mini releases; the pipeline also commits earlier ones there as training
# progress (so that a fresh machine resumes from them), which `assets mini` says
READER_SETTINGS = frozenset({"window_s", "beam_size", "slot_rate"})  # how the word reader reads, not its weights
RELEASE_STAGES = ("core_cocktail_stage2", "speak", "speak_prosody", "reader_noisy", "hear_copy", "speak_adapt",
                  "hear_distill_s2s", "speak_prosody_r7")
# generation defaults the assembled mini ships (config.json fun_audio_chat_mini.generation; engine/presets.py):
# greedy text from the 135M LLM can loop ("9 * 12 = 9 * 12 = ...") to the token limit; three copies end it. Its
# text runs three LLM steps ahead of its speech (its LLM does not read its speech), so the head sees a number or a
# short answer before it must say it (docs/mini.md, "The text lead"); six for an answer asked to be fast, which says
# the text's units sooner (docs/mini.md, '"Faster": a longer text lead')
MINI_GENERATION = {"text_loop_stop": 3, "text_lead": 3, "fast_text_lead": 6}
# and the calibration of a head trained with the answer's prosody: its "faster" answers said at the pace the data
# teaches (the positive rate bias x1.4, chosen on the dev split; docs/mini.md, '"Faster": the rate bias calibrated'
# and '"Faster" on the dev split'); a setting the deltas record themselves wins
MINI_PROSODY = {"srh_speedup_scale": 1.4}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def extract(final_dir: str | Path, base_dir: str | Path,
            stage: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The deltas of a trained checkpoint against its starting checkpoint, and the file's metadata (with `stage`,
    the recipe stage they come from, when given: the mini pipeline restores that stage from them)."""
    final_dir, base_dir = Path(final_dir), Path(base_dir)
    for d in (final_dir, base_dir):
        lora.require_export(d)
    final, base = read_state_dict(final_dir), read_state_dict(base_dir)
    cfg, final_cfg = FunAudioChatConfig.load(base_dir), FunAudioChatConfig.load(final_dir)
    changed = audio_settings(final_cfg, cfg)
    # the reader's Whisper weights are pip-shipped: the base's, but for the layers a stage trained (reader_noisy),
    # which ship like any trained tensor; how it reads (its window, beam, slots a second) ships in the metadata
    reader = changed.pop("word_reader", None)
    if reader is not None and (cfg.audio_config.word_reader is None or _reader_weights_differ(
            reader, cfg.audio_config.word_reader)):
        raise CheckpointError(f"{final_dir} and {base_dir} differ in their word reader: extract against the starting "
                              f"checkpoint it was trained from (`assets smollm2 --word-reader`)")
    added = final.keys() - base.keys()  # tensors of a setting training switched on (the SRH's pending view)
    if base.keys() - final.keys() or (added and not changed):
        odd = sorted(final.keys() ^ base.keys())
        raise CheckpointError(f"{final_dir} and {base_dir} hold different tensors ({odd[:4]}): not the same model")
    folded = lora.load_delta(final_dir)
    rebuilt = lora.apply(base, folded)
    deltas: dict[str, torch.Tensor] = {}
    for key, tensor in final.items():
        if key in added:
            deltas[key] = tensor
            continue
        if tensor.shape != base[key].shape:
            raise CheckpointError(f"{key}: shape {tuple(tensor.shape)} in {final_dir}, {tuple(base[key].shape)} in "
                                  f"{base_dir}: not the same model")
        if not key.startswith(lora.LLM_PREFIX):
            if not torch.equal(tensor, base[key]):
                deltas[key] = tensor
            continue
        scale = max(1.0, float(tensor.abs().max())) if tensor.numel() else 1.0
        err = float((tensor.float() - rebuilt[key].float()).abs().max()) if tensor.numel() else 0.0
        if err > LLM_RTOL * scale:
            raise CheckpointError(f"{key}: {final_dir} differs from {base_dir} + its LoRA delta by {err:.3g}: the "
                                  f"LLM was trained outside low-rank adapters, so it cannot ship as a small delta")
    deltas.update(folded)
    seed = (cfg.extra.get("fun_audio_chat_mini") or {}).get("seed", 0)
    srh = cfg.audio_config.crq_transformer_config
    meta = {"format": FORMAT, "seed": str(seed), "srh_hidden": str(srh.hidden_size),
            "srh_layers": str(srh.num_hidden_layers), "trained": json.dumps(trained_parts(deltas, cfg.audio_config.word_reader is not None))}
    if final_cfg.audio_config.word_reader is not None:  # Whisper's decoder (pip-shipped) attached
        meta["word_reader"] = json.dumps(final_cfg.audio_config.word_reader, sort_keys=True)  # and its settings
    if changed:
        meta["audio_config"] = json.dumps(changed, sort_keys=True)
    if stage:
        meta["stage"] = stage
    return deltas, meta


def _reader_weights_differ(a: dict, b: dict) -> bool:
    """Whether two word-reader configs differ in more than how they read (READER_SETTINGS)."""
    a, b = WordReaderConfig.from_dict(a).to_dict(), WordReaderConfig.from_dict(b).to_dict()
    return any(a[k] != b[k] for k in a.keys() - READER_SETTINGS)


def audio_settings(trained: FunAudioChatConfig, base: FunAudioChatConfig) -> dict:
    """The `audio_config` entries a training run set differently from its starting model (the SRH's stack is fixed
    by the tensors' shapes, so it is not compared)."""
    now, before = trained.audio_config.to_dict(), base.audio_config.to_dict()
    now.pop("crq_transformer_config"), before.pop("crq_transformer_config")
    return {k: v for k, v in now.items() if before.get(k) != v}


def reader_settings(meta: dict[str, str], source: str) -> dict | bool:
    """The word reader's config the deltas were trained with (False: the model has no reader)."""
    recorded = meta.get("word_reader")
    if not recorded:
        return False
    if recorded == "1":  # release 1 recorded no settings: one slot per Whisper token, 30 s windows
        raise CheckpointError(f"{source}: deltas of the first word-reader release (one slot per Whisper token), "
                              f"which this version no longer builds; retrain them from `assets smollm2 --word-reader`")
    return json.loads(recorded)


def trained_parts(deltas: dict[str, torch.Tensor], word_reader: bool = False) -> dict[str, bool]:
    """config.json `trained` from the tensors the deltas hold (config.TRAINABLE_PARTS); a model with a word reader
    hears through Whisper's pretrained decoder whatever the deltas hold."""
    names = [k for k in deltas if not lora.is_adapter(k)]
    parts = {part: any(k.startswith(prefixes) for k in names) for part, prefixes in TRAINABLE_PARTS.items()}
    parts["hearing"] = parts["hearing"] or word_reader
    return parts


def write(deltas: dict[str, torch.Tensor], meta: dict[str, str], out_dir: str | Path, bf16: bool = False) -> Path:
    """Write OUT/deltas.safetensors; `bf16` stores every tensor in bfloat16 (read() returns them in float32)."""
    out_dir = Path(out_dir)
    if bf16:
        deltas = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in deltas.items()}
        meta = {**meta, "dtype": "bfloat16"}
    size = sum(t.numel() * t.element_size() for t in deltas.values())
    if size > MAX_BYTES:
        raise CheckpointError(f"the deltas take {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB budget of "
                              f"models/mini/: train fewer encoder layers or a lower lora.rank")
    out_dir.mkdir(parents=True, exist_ok=True)
    return lora.save(deltas, out_dir / DELTAS_FILE, meta)


def read(deltas_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The deltas file of `deltas_dir`, checked: present, within the size budget, our format."""
    deltas_dir = Path(deltas_dir)
    hint = "train them with recipes/mini/*.yaml and write them with `funaudiochat assets mini-deltas`"
    if not deltas_dir.is_dir():
        raise CheckpointError(f"{deltas_dir}: no such folder (it holds the trained parts of fun-audio-chat-mini; "
                              f"{hint})")
    path = deltas_dir / DELTAS_FILE
    if not path.is_file():
        raise CheckpointError(f"{deltas_dir}: no {DELTAS_FILE} ({hint})")
    size = sum(f.stat().st_size for f in deltas_dir.glob("*.safetensors"))
    if size > MAX_BYTES:
        raise CheckpointError(f"{deltas_dir}: {size / 1e6:.1f} MB of safetensors, over the "
                              f"{MAX_BYTES / 1e6:.0f} MB budget")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}  # (bf16 files)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fun-audio-chat-mini deltas file (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    return tensors, meta


def stage_of(path: str | Path) -> str | None:
    """The recipe stage recorded in a deltas file (its metadata alone: no tensor is read); None when none is."""
    return lora.metadata(path).get("stage")


def apply_deltas(model: torch.nn.Module, deltas: dict[str, torch.Tensor], source: str) -> None:
    """Replace the full tensors and add the LoRA deltas in `model` (in place); names and shapes must fit."""
    state = model.state_dict()
    factors = {k: v for k, v in deltas.items() if lora.is_adapter(k)}
    full = {k: v for k, v in deltas.items() if not lora.is_adapter(k)}
    wrong = [f"{k} (not in the model)" for k in full if k not in state] + \
        [f"{k}: {tuple(v.shape)} vs {tuple(state[k].shape)}" for k, v in full.items()
         if k in state and v.shape != state[k].shape]
    if wrong:
        raise CheckpointError(f"{source} does not fit this model: {'; '.join(wrong[:4])}")
    try:
        state = lora.apply({**state, **full}, factors)
    except CheckpointError as err:
        raise CheckpointError(f"{source} does not fit this model: {err}") from None
    load_state_dict_checked(model, state, source)


def with_audio_settings(model: FunAudioChatModel, settings: dict, source: str,
                        deltas: dict[str, torch.Tensor]) -> FunAudioChatModel:
    """`model` rebuilt with `settings` merged into its audio_config (checked as any config.json is), same weights;
    the tensors a setting adds (the SRH's pending view) come from `deltas`."""
    cfg = FunAudioChatConfig.from_dict(model.cfg.to_dict())
    try:
        cfg.audio_config = AudioConfig.from_dict({**cfg.audio_config.to_dict(), **settings}, f"{source}: audio_config")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    rebuilt = FunAudioChatModel(cfg)
    state = model.state_dict()
    added = {k: v for k, v in deltas.items() if k not in state and k in rebuilt.state_dict()}
    load_state_dict_checked(rebuilt, {**state, **added}, source)
    return rebuilt


def assemble(out_dir: str | Path, deltas_dir: str | Path, base_dir: str | Path | None = None,
             gguf_path: str | Path | None = None, whisper_dir: str | Path | None = None) -> Path:
    """The full fun-audio-chat-mini checkpoint in `out_dir`: the starting model (from the pip-shipped parts with
    the deltas' seed, or an existing `base_dir`), plus the deltas; config `trained` set from what they hold (and
    the Piper detokenizer.json when they trained the SRH)."""
    from funaudiochat import fileio
    from funaudiochat.model.checkpoint import load_model

    deltas, meta = read(deltas_dir)
    source = str(Path(deltas_dir) / DELTAS_FILE)
    out_dir = Path(out_dir)
    with fileio.atomic_path(out_dir, directory=True) as tmp:
        if base_dir is not None:
            if not (Path(base_dir) / "config.json").is_file():
                raise CheckpointError(f"--base {base_dir}: no checkpoint folder with a config.json")
            model = load_model(base_dir, dtype=torch.float32)
            if model.word_reader is not None and meta.get("word_reader"):  # read as it was trained to read
                set_reader_settings(model, reader_settings(meta, source), source)
            for name in TOKENIZER_FILES:
                if (Path(base_dir) / name).is_file():
                    shutil.copyfile(Path(base_dir) / name, tmp / name)
        else:
            from funaudiochat.assets.gguf_tokenizer import write_tokenizer
            from funaudiochat.assets.mini import build_mini

            mini = build_mini(seed=int(meta.get("seed", 0)), srh_hidden=int(meta.get("srh_hidden", 256)),
                              srh_layers=int(meta.get("srh_layers", 2)), gguf_path=gguf_path, whisper_dir=whisper_dir,
                              word_reader=reader_settings(meta, source))
            model = mini.model
            write_tokenizer(mini.gguf, tmp, mini.tokenizer)
        settings = json.loads(meta["audio_config"]) if meta.get("audio_config") else {}
        if settings.get("srh_answer_prosody"):
            settings = {**MINI_PROSODY, **settings}
        if settings:  # settings the trained parts were trained with (and the prosody's calibration): rebuild with them
            model = with_audio_settings(model, settings, source, deltas)
        apply_deltas(model, deltas, source)
        model.cfg.trained = trained_parts(deltas, model.word_reader is not None)
        # the system prompt of the training data: infer, chat, serve and eval use it when none is given
        mini_extra = model.cfg.extra.setdefault("fun_audio_chat_mini", {})
        mini_extra["system"] = MINI_SYSTEM
        mini_extra["generation"] = MINI_GENERATION  # what infer, chat, serve and eval apply over a mode's preset
        save_model(model, tmp)
        factors = {k: v for k, v in deltas.items() if lora.is_adapter(k)}
        if factors:  # the LLM's delta, recorded as training records it: a LoRA stage trained on this still ships
            lora.save(factors, tmp / lora.DELTA_FILE)
        if model.cfg.trained["speaking"]:  # a trained SRH speaks the mini's speech tokens: the Piper voice's
            (tmp / DETOKENIZER_FILE).write_text(json.dumps({"kind": "piper-joe"}) + "\n", encoding="utf-8")
    return out_dir

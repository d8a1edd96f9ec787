"""Hyper-parameters of the CosyVoice3 detokenizer (flow matching token->mel, HiFT mel->wav).

The defaults equal the released Fun-CosyVoice3-0.5B model (`cosyvoice3.yaml`). Two readers fill them from files:

- `load_cosyvoice_config(path)`: the released HyperPyYAML file, parsed as plain data. Its tags (`!new:`, `!name:`,
  `!apply:`, `!ref`) are never executed: tagged mappings become dicts, `!ref <a> * <b>` is evaluated as arithmetic
  over the file's own top-level numbers, everything else tagged is ignored.
- `cosyvoice_config_from_dict(d)`: the `config.json` layout of the golden directories (`flow`, `pre_lookahead`,
  `cfm`, `dit`, `hift`, `f0` sections).
"""
from __future__ import annotations

import ast
import dataclasses
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from funaudiochat.errors import ConfigError


@dataclass
class DiTConfig:
    """The flow's velocity estimator (a DiT with AdaLN-zero blocks)."""

    dim: int = 1024
    depth: int = 22
    heads: int = 16
    dim_head: int = 64
    ff_mult: int = 2
    mel_dim: int = 80
    mu_dim: int = 80
    spk_dim: int = 80
    out_channels: int = 80
    static_chunk_size: int = 50  # frames a query may see up to (chunk end) when streaming: chunk_size * token_mel_ratio
    num_decoding_left_chunks: int = -1  # ignored by the released forward (always all left chunks)


@dataclass
class FlowConfig:
    """Token -> mel flow (`CausalMaskedDiffWithDiT` + `CausalConditionalCFM`)."""

    input_size: int = 80
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    token_mel_ratio: int = 2  # 25 Hz tokens -> 50 Hz mel
    pre_lookahead_len: int = 3
    pre_lookahead_channels: int = 1024
    n_timesteps: int = 10  # hard-coded in the released `inference`
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    dit: DiTConfig = field(default_factory=DiTConfig)


@dataclass
class HiFTConfig:
    """Mel -> wav vocoder (`CausalHiFTGenerator`: NSF source + iSTFTNet, with `CausalConvRNNF0Predictor`)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    conv_pre_look_right: int = 4
    f0_cond_channels: int = 512
    f0_num_class: int = 1

    @property
    def samples_per_frame(self) -> int:
        """Output samples per mel frame (480 = 8*5*3*4)."""
        n = self.hop_len
        for r in self.upsample_rates:
            n *= r
        return n


@dataclass
class CosyVoiceConfig:
    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)
    sample_rate: int = 24000
    token_frame_rate: int = 25

    @property
    def samples_per_token(self) -> int:
        return self.flow.token_mel_ratio * self.hift.samples_per_frame


def tiny() -> CosyVoiceConfig:
    """The cv-tiny golden configuration (DiT 64 x 2 layers, HiFT base 16, chunk 30 frames): fast tests."""
    return CosyVoiceConfig(
        flow=FlowConfig(pre_lookahead_channels=32, dit=DiTConfig(dim=64, depth=2, heads=4, dim_head=16,
                                                                 static_chunk_size=30)),
        hift=HiFTConfig(base_channels=16, f0_cond_channels=16))


def _fill(cls, src: dict, where: str, **renames):
    """A `cls` with every field found in `src` (under its own name or `renames[field]`), type-checked."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = renames.get(f.name, f.name)
        if key not in src or f.default is dataclasses.MISSING:  # nested sections are filled by the caller
            continue
        value, default = src[key], f.default
        try:
            if isinstance(default, tuple):
                value = tuple(tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else int(v) for v in value)
            elif isinstance(default, str):
                value = str(value)
            elif isinstance(default, int):
                if float(value) != int(value):
                    raise ValueError("not an integer")
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}.{key} = {value!r} is not a valid {type(default).__name__} ({err})") from None
        kwargs[f.name] = value
    return cls(**kwargs)


def _section(d: dict, key: str, where: str) -> dict:
    value = d.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{key} should be a mapping, got {type(value).__name__}")
    return value


# ---- the golden config.json layout -------------------------------------------------------------------------------

def cosyvoice_config_from_dict(d: dict) -> CosyVoiceConfig:
    """Build from the golden `config.json` layout; missing sections or fields keep the released defaults."""
    flow_src = dict(_section(d, "flow", "config"))
    flow_src.update({f"pre_{k}": v for k, v in _section(d, "pre_lookahead", "config").items()})
    flow_src.update(_section(_section(d, "cfm", "config"), "cfm_params", "config.cfm"))
    if "n_timesteps" in d:
        flow_src["n_timesteps"] = d["n_timesteps"]
    flow = _fill(FlowConfig, flow_src, "flow", pre_lookahead_channels="pre_channels")
    flow.dit = _fill(DiTConfig, _section(d, "dit", "config"), "dit")
    hift_src = dict(_section(d, "hift", "config"))
    hift_src.update(_section(hift_src, "istft_params", "hift"))
    f0 = _section(d, "f0", "config")
    hift_src.update({"f0_cond_channels": f0.get("cond_channels", 512), "f0_num_class": f0.get("num_class", 1)})
    hift = _fill(HiFTConfig, hift_src, "hift")
    return CosyVoiceConfig(flow=flow, hift=hift, sample_rate=hift.sampling_rate)


# ---- the released HyperPyYAML file, read as data -----------------------------------------------------------------

class _Ref(str):
    """The text of a `!ref` tag, resolved after loading."""


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader that turns every `!tag` into plain data and never imports or calls anything."""


def _construct_tagged(loader: _PlainLoader, tag_suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_PlainLoader.add_multi_constructor("!ref", lambda loader, suffix, node: _Ref(loader.construct_scalar(node)))
_PlainLoader.add_multi_constructor("!", _construct_tagged)

_REF_NAME = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.USub: operator.neg}


def _arith(node: ast.AST):
    """Evaluate a tree of numbers and + - * / // only."""
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.operand))
    raise ValueError("only numbers and + - * / are supported")


def _resolve(value, top: dict, path: str):
    if isinstance(value, dict):
        return {k: _resolve(v, top, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, path) for v in value]
    if not isinstance(value, _Ref):
        return value
    names = _REF_NAME.findall(value)
    if len(names) == 1 and value.strip() == f"<{names[0]}>":
        target = top.get(names[0])
        return _resolve(target, top, names[0]) if isinstance(target, _Ref) else target
    expr = value
    for name in names:
        target = _resolve(top.get(name), top, name)
        if not isinstance(target, (int, float)):
            return None  # a reference to something that is not a number (an object, a path): not a hyper-parameter
        expr = expr.replace(f"<{name}>", repr(target))
    try:
        return _arith(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError) as err:
        raise ConfigError(f"{path}: cannot evaluate !ref {value!r} ({err})") from None


def load_cosyvoice_config(path: str | Path) -> CosyVoiceConfig:
    """Read the flow and HiFT hyper-parameters from a released `cosyvoice3.yaml` without executing it."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_PlainLoader)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    top = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    d = _resolve(raw, top, path.name)
    flow_d = _section(d, "flow", path.name)
    if not flow_d or not _section(d, "hift", path.name):
        raise ConfigError(f"{path}: no `flow:` and `hift:` sections; is this a CosyVoice3 model yaml?")
    decoder = _section(flow_d, "decoder", "flow")
    cfm_params = _section(decoder, "cfm_params", "flow.decoder")
    flow_src = dict(flow_d)
    flow_src.update(_section(cfm_params, "content", "flow.decoder.cfm_params") or cfm_params)
    flow_src["pre_lookahead_channels"] = _section(flow_d, "pre_lookahead_layer", "flow").get("channels", 1024)
    flow = _fill(FlowConfig, flow_src, "flow")
    flow.dit = _fill(DiTConfig, _section(decoder, "estimator", "flow.decoder"), "flow.decoder.estimator")
    hift_d = dict(d["hift"])
    hift_d.update(_section(hift_d, "istft_params", "hift"))
    f0 = _section(hift_d, "f0_predictor", "hift")
    hift_d.update({"f0_cond_channels": f0.get("cond_channels", 512), "f0_num_class": f0.get("num_class", 1)})
    hift = _fill(HiFTConfig, hift_d, "hift")
    return CosyVoiceConfig(flow=flow, hift=hift, sample_rate=int(d.get("sample_rate", hift.sampling_rate)),
                           token_frame_rate=int(d.get("token_frame_rate", 25)))

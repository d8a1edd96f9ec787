"""Generation: prefill + step loop over pre-allocated KV caches, text and speech at once (SPEC.md §7).

Each step feeds one input per row to the LLM (the last text token, fused with the last speech group while speech is
active: (E_text(t) + Enc(g)) / 2), runs the Speech Refined Head 5 times (one fine position each, the first seeded
with the embedding of the SRH's previous token), then picks the next text token. The SRH runs on every step, also
outside speech mode, as released: its cache covers every LLM position x 5 and the discarded group seeds the next.
With a text lead (`GenerationConfig.text_lead` L, a model whose LLM does not read its speech) the SRH's group of a
step is that of the LLM position L steps back, so the text the head reads runs L ids further ahead; an answer asked
to be fast takes `fast_text_lead` instead (`Engine.lead_of`; rows of one batch share a lead, so the server batches
fast answers apart).

Unlike the released code (SPEC §13 item 4) a batch is exact: left padding is masked in the LLM and the SRH, rope
positions start at each row's first real token, speech gating, forcing and stopping are per row. All state lives
in `DecodeState`; modules hold none.

Shape legend: B batch, P prompt length, S cache slots, k group size, D LLM width, V text vocab, Vs speech codebook.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from funaudiochat.engine.compiled import CACHE_BUCKET, CompiledDecoder, answer_prosody, srh_input, step_input
from funaudiochat.engine.prompt import Prompt, stack_prompts
from funaudiochat.engine.sampling import SamplingParams, choose, exponential_noise, process
from funaudiochat.errors import ConfigError, ContextLengthError
from funaudiochat.model.backbone import MLP, Attention, KVCache, RopeTable, attention_mask_4d
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.quantize import DECODE_WEIGHTS, is_quantized, prompt_products, set_decode_weights
from funaudiochat.speech.pending_units import HOLD_PRIOR_FROM, PAD, follow_on, is_start, text_locked, window


@dataclass(frozen=True)
class GenerationConfig:
    """Released generate kwargs + `sp_gen_kwargs` (SPEC §4, §7). Sampling settings shape text and speech alike."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: int | tuple = 151645
    pad_token_id: int = 151643
    bad_words_ids: tuple = ()          # text only, e.g. ((audio_bos, sil),) bans <|sil|> right after <|audio_bos|>
    text_greedy: bool = False          # text = argmax of raw logits
    disable_speech: bool = False       # pure speech-to-text: the SRH never runs
    force_text_abos: bool = False      # first text token is <|audio_bos|> (starts speech)
    speech_holds_turn: bool = False    # a speaking row's text, once ended, pads with <|sil|> until its speech ends
    #   (an end-of-turn id then ends the text, not the turn): the stream format the released data teaches (SPEC
    #   §6.4), enforced for small models that say <|im_end|> mid-speech or write on after <|sil|> (not released)
    speech_follows_text: bool = True   # a head with the pending-units view says the text's units: its mass on
    #   starting / continuing any unit goes to the next pending unit / the unit being spoken (pending_units.text_locked),
    #   so it times the text's phonemes instead of choosing them; no speech repetition penalty then (the same frame
    #   token repeats by design while a unit lasts)
    text_loop_stop: int = 0            # n >= 2: a text that says the same span of ids (up to LOOP_SPAN) n times in a
    #   row ends there (its next id becomes the end of turn): greedy text from a small model can loop to the token
    #   limit (not released: 0, off)
    text_lead: int = 0                 # L >= 1: the text runs L LLM steps ahead of the speech: the SRH's group at
    #   step t reads the LLM's state of step t - L, so a head with the pending-units view sees L more text ids (a
    #   number, a short answer) before it must say them. Only for a model whose LLM does not read its own speech
    #   (audio_config.speech_feedback false: its text is the same whatever is said). Not released: 0
    fast_text_lead: int = 0            # L' > text_lead: the lead of a spoken answer asked to be fast (its answer
    #   prosody's rate bias positive at the opener): a fast voice says the text's units sooner, so its text must
    #   run further ahead. 0: text_lead for every answer
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        n = self.text_loop_stop
        if not isinstance(n, int) or isinstance(n, bool) or n == 1 or n < 0:
            raise ConfigError(f"text_loop_stop must be 0 (off) or an integer >= 2 (repeats), got {n!r}")
        for name in ("text_lead", "fast_text_lead"):
            lead = getattr(self, name)
            if not isinstance(lead, int) or isinstance(lead, bool) or not 0 <= lead <= 16:
                raise ConfigError(f"{name} must be an integer within [0, 16] LLM steps, got {lead!r}")
        if self.fast_text_lead and not 1 <= self.text_lead <= self.fast_text_lead:
            raise ConfigError(f"fast_text_lead ({self.fast_text_lead}) needs a text_lead of at least 1 and at most "
                              f"it, got {self.text_lead}")
        self.sampling  # validates the sampling fields

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.do_sample, self.temperature, self.top_k, self.top_p, self.repetition_penalty)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else (self.eos_token_id,)

    @property
    def longest_lead(self) -> int:
        """The most LLM steps a spoken answer's text may run ahead of its speech (cache slots to keep)."""
        return max(self.text_lead, self.fast_text_lead)

    def with_(self, **changes) -> "GenerationConfig":
        return replace(self, **changes)


LOOP_SPAN = 40  # the longest span of text ids `text_loop_stop` looks for


@dataclass
class DecodeState:
    """Everything that changes during one generation call."""

    llm_cache: KVCache
    srh_cache: KVCache | None
    key_valid: torch.Tensor       # [B, S] LLM slots that may be attended (left pads are not)
    srh_key_valid: torch.Tensor   # [B, kS]
    pos: torch.Tensor             # [B] rope position of the next LLM input
    slot: int                     # next LLM cache slot (shared by all rows)
    prompt_ids: torch.Tensor      # [B, P]
    padded: bool = False          # some row is left padded (decode then needs key masks)
    tokens: list[torch.Tensor] = field(default_factory=list)  # generated text ids, one [B] per step
    speech: list[list[int]] = field(default_factory=list)      # per row: appended speech ids (groups of k)
    last_token: torch.Tensor | None = None    # [B] input of the next step
    last_group: torch.Tensor | None = None    # [B, k] last appended speech group
    fuse: torch.Tensor | None = None          # [B] next input fuses text and speech
    active: torch.Tensor | None = None        # [B] speech mode, as the text sees it (the LLM's input opened an answer)
    voicing: torch.Tensor | None = None       # [B] speech mode as the SRH sees it: its group's step input opened an
    #   answer (with text_lead L, L steps after `active`; the same otherwise)
    lead: list = field(default_factory=list)  # text_lead: the LLM steps whose speech group is still to come, oldest
    #   first, each (hidden [B, 1, D], text embedding [B, 1, D], input id [B], position [B], slot)
    text_lead: int | None = None  # the lead in force (all rows): set by the first decode step (`Engine.lead_of`)
    prefilled: tuple | None = None  # the forced opener's LLM position computed by the prefill (`PrefillJob`): hidden
    #   [B, 1, D], text embedding [B, 1, D], text logits [B, V], for the first decode step
    fast_rows: torch.Tensor | None = None  # [B] rows asked to be fast (fast_text_lead), set with it
    group_token: torch.Tensor | None = None   # [B] the input id of the step whose speech group came last
    finished: torch.Tensor | None = None      # [B]
    srh_embed: torch.Tensor | None = None     # [B, D] embedding of the SRH's last sampled token
    answer_style: torch.Tensor | None = None  # [B, S] the spoken answer's style input to the SRH (srh_answer_style)
    #   and, with srh_answer_cue, the running cue's sum and count (FunAudioChatModel.answer_state_size)
    text_counts: torch.Tensor | None = None   # [B, V] history for the text repetition penalty
    speech_counts: torch.Tensor | None = None  # [B, Vs]
    answers: list | None = None               # per row: its AnswerUnits when the SRH reads pending units
    text_ended: torch.Tensor | None = None    # [B] the speaking row's text has ended (speech_holds_turn)
    recent_text: torch.Tensor | None = None   # [B, n * LOOP_SPAN] the last text ids chosen, -1 before the first
    #   (text_loop_stop n)
    generator: torch.Generator | None = None
    timings: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.prompt_ids.shape[0]

    def lead_in_force(self, gen: GenerationConfig) -> int:
        """The text lead of this state's answers: its own once the first decode step set it, else `gen`'s."""
        return self.text_lead if self.text_lead is not None else gen.text_lead

    @property
    def done(self) -> bool:
        return bool(self.finished.all())


@dataclass
class StepResult:
    """What one step produced: text ids [B] (after the speech-EOS overwrite), the speech group [B, k] appended to
    rows with `speech_mask`, rows whose speech ended, and rows that finished."""

    text: torch.Tensor
    speech: torch.Tensor | None
    speech_mask: torch.Tensor
    speech_ended: torch.Tensor
    finished: torch.Tensor


class Tracer:
    """Collects what the golden files record: per-step text logits/scores, every SRH call's logits/scores/tokens."""

    def __init__(self):
        self.text_logits, self.text_scores = [], []
        self.srh_logits, self.srh_scores, self.srh_tokens = [], [], []
        self.prefill_embeds = None


class Engine:
    """Runs a `FunAudioChatModel` for generation. Stateless between calls; `DecodeState` holds a call's state.

    Construction prepares the model for fast inference (fused q|k|v and gate|up projections, rotary tables, on CPU
    the weight layout that its decoding reads fastest), so create the engine after the model is on its final device
    and dtype, and do not train that model afterwards. Engines sharing a model stay correct, but the last one created
    sets the layout and the decode weights for all. `compile` compiles the decode steps (engine/compiled.py); on a
    GPU they are then replayed as CUDA graphs unless `cuda_graphs` is false. `decode_weights` "fp16" (compiled CPU
    decoding of an fp32 model): the decode steps read fp16 copies of the LLM's and speech head's weights
    (model/quantize.py `set_decode_weights`).
    """

    def __init__(self, model: FunAudioChatModel, max_seq_len: int = 4096, compile: bool = False,
                 pending_view=None, cuda_graphs: bool = True, decode_weights: str = "fp32"):
        width = model.audio_invert_tower.pending_width if model.audio_invert_tower is not None else 0
        if width and (pending_view is None or pending_view.width != width):
            raise ConfigError(f"this checkpoint's speech head reads the next {width} pending units "
                              f"(audio_config.srh_pending_units): pass Engine(pending_view=...) of that width "
                              f"(speech/pending_units.py view_for; load_runtime does it)")
        self.pending_view = pending_view if width else None
        self.model = model.eval()
        self.cfg = model.cfg
        self.k = model.group_size
        # with `speech_holds_turn`, a turn ends with its speech where the LLM was never taught the spoken format's
        # tail (a speech opener keeps a text LLM, which reads <|audio_eos|> as the end of *user* audio and writes
        # on); other models are asked for the end of turn after <|audio_eos|>, as released
        self.turn_ends_with_speech = self.cfg.audio_config.speech_opener
        t = self.cfg.text_config
        self.max_seq_len = min(max_seq_len, t.max_position_embeddings)
        if self.device.type == "cpu":
            _weight_layout(model, column_major=not compile)
        _check_decode_weights(decode_weights, compile, self.device, self.dtype, is_quantized(model))
        set_decode_weights(model, decode_weights)
        self.decode_weights = decode_weights
        for m in model.modules():
            if isinstance(m, (Attention, MLP)):
                m.fuse()  # (again if an earlier engine fused it: the layout may have changed)
        self.rope = RopeTable(model.language_model.model.inv_freq, self.max_seq_len, self.dtype)
        self.srh_rope = None
        if model.audio_invert_tower is not None:
            srh = model.audio_invert_tower.crq_transformer
            self.srh_rope = RopeTable(srh.inv_freq, self.k * self.max_seq_len, self.dtype)
        self.compiled = CompiledDecoder(model, self.rope, self.srh_rope, cuda_graphs) if compile else None
        self.quantized = is_quantized(model)
        self.speech_bias: torch.Tensor | None = None  # [Vs] 0 / -inf: speech codes the detokenizer can render
        from funaudiochat.engine.prefix_cache import PrefixStore  # (it imports this module)
        self.prefixes = PrefixStore()  # shared prefixes' keys and values, for the ChatSessions on this engine
        self.fold_opener = True  # prefill a forced opener with the prompt (`PrefillJob`); False: a step of its own

    def prompt_pass(self):
        """The context of a pass over a prompt's positions (prefill layers, the audio encoder): a quantized engine
        multiplies in bf16 there where the CPU computes it natively (model/quantize.py `prompt_products`); an fp32
        or bf16 engine computes as it always does."""
        return prompt_products(self.device) if self.quantized else nullcontext()

    def restrict_speech_codes(self, valid_codes) -> None:
        """Sample only `valid_codes` (and the specials bos/eos/pad) as speech: codes a detokenizer would refuse are
        never drawn, however sloppy the SRH. None lifts the restriction (the default: every code)."""
        if valid_codes is None:
            self.speech_bias = None
            return
        a_cfg = self.cfg.audio_config
        allowed = torch.zeros(a_cfg.codebook_size, dtype=torch.bool)
        allowed[a_cfg.num_codes:] = True
        codes = torch.as_tensor(list(valid_codes), dtype=torch.long)
        allowed[codes[(codes >= 0) & (codes < a_cfg.num_codes)]] = True
        if not allowed[:a_cfg.num_codes].any():
            raise ConfigError(f"none of the detokenizer's speech codes is in this model's [0, {a_cfg.num_codes})")
        self.speech_bias = torch.zeros(a_cfg.codebook_size).masked_fill(~allowed, float("-inf")).to(self.device)

    @property
    def device(self):
        return self.model.language_model.model.norm.weight.device

    @property
    def dtype(self):
        """Activations and KV caches (the final norm's dtype: int8 models keep it fp32)."""
        return self.model.language_model.model.norm.weight.dtype

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, prompt: Prompt, gen: GenerationConfig, tracer: Tracer | None = None):
        """The whole prompt at once -> (DecodeState, text logits [B, V] of the last position, SRH group or None)."""
        job = PrefillJob(self, prompt, gen, tracer)
        while not job.advance():
            pass
        return job.result

    @torch.no_grad()
    def encode_ahead(self, prompts: list[Prompt]) -> None:
        """Encode the audios of several prompts in one call, in place: each audio with log-mel features becomes its
        5 Hz vectors (`Prompt.audio_groups`, as `IncrementalAudio` gives them), so the prompts' prefills do not
        encode it again. One call batches the encoder's windows and the word reader's beam searches of all of them:
        the reader's steps are bound by reading its weights, so N questions cost far less together than one by one
        (the server's prompts that wait at the same moment). Each audio's vectors are those its own prefill would
        compute (the encoder and reader treat the audios independently)."""
        with_features = [p for p in prompts if p.input_features is not None]
        if not with_features:
            return
        a_cfg = self.cfg.audio_config
        stacked = stack_prompts(with_features, a_cfg.pad_token_id, a_cfg.pad_token_id)  # (only its audio inputs)
        encode = stacked.feature_exist_mask  # [A] the audios with features, in the order of their feature rows
        dev = self.device
        with self.prompt_pass():
            audio = self.model.encode_audio(stacked.speech_ids[encode].to(dev),
                                            stacked.speech_attention_mask[encode].to(dev),
                                            _opt(stacked.input_features, dev, self.dtype),
                                            stacked.feature_attention_mask.to(dev))
        rows = iter(range(audio.features.shape[0]))
        for p in with_features:
            if p.audio_groups is None:
                p.audio_groups = [None] * p.speech_ids.shape[0]
            for i in p.feature_exist_mask.nonzero()[:, 0].tolist():
                r = next(rows)
                p.audio_groups[i] = audio.features[r, : int(audio.n_groups[r])]
            p.feature_exist_mask = torch.zeros_like(p.feature_exist_mask)
            p.input_features = p.feature_attention_mask = None

    def start_prefill(self, prompt: Prompt, gen: GenerationConfig, chunk: int | None = None,
                      prefix: "PrefixKV | None" = None, save_prefix: int = 0,
                      cache_len: int | None = None) -> "PrefillJob":
        """A prefill to run piece by piece (see `PrefillJob`), e.g. between the decode steps of other sessions. Its
        result's text logits are None where the first text id is forced and text greedy (nothing reads them)."""
        unread = gen.force_text_abos and gen.text_greedy
        return PrefillJob(self, prompt, gen, None, chunk, prefix, save_prefix, cache_len, first_logits=not unread)

    # ------------------------------------------------------------------ SRH
    def _srh_group(self, state: DecodeState, fine: torch.Tensor, fine_pos: torch.Tensor, embed: torch.Tensor,
                   llm_len: int, gen: GenerationConfig, tracer: Tracer | None) -> torch.Tensor:
        """Sample one group of k speech tokens for the last LLM position.

        fine [B, kl, D] / fine_pos [B, kl]: ungrouped LLM states of the l new positions (l = P at prefill, else 1),
        whose SRH slots are [k*(llm_len-l), k*llm_len). The first call covers all but the last k-1 fine positions.
        """
        srh, k, b = self.model.audio_invert_tower, self.k, fine.shape[0]
        n_fine = fine.shape[1]
        start = k * llm_len - n_fine
        counts = state.speech_counts.clone() if state.speech_counts is not None else None
        noise = self._speech_noise(state, gen)
        upcoming = self._upcoming(state)
        follow = self._follow_inputs(state, gen)
        prosody = answer_prosody(self.model, state.answer_style)
        a_cfg = self.cfg.audio_config
        started = torch.zeros(b, dtype=torch.long, device=self.device)
        tokens = []
        for j in range(k):
            q0, q1 = (0, n_fine - (k - 1)) if j == 0 else (n_fine - k + j, n_fine - k + j + 1)
            z = fine[:, q0:q1] + embed[:, None]
            if upcoming is not None:  # the last query predicts the group's next token; earlier ones are the prompt's
                pending = torch.full((b, q1 - q0, srh.pending_width), PAD, dtype=torch.long, device=self.device)
                pending[:, -1] = window(upcoming, started, srh.pending_width)
                z = z + srh.pending_view(pending)
            s0, s1 = start + q0, start + q1
            if q1 - q0 == 1:  # one new query sees every valid slot so far (all of them without padding)
                mask = state.srh_key_valid[:, None, None, :s1] if state.padded else None
            else:
                mask = attention_mask_4d(state.srh_key_valid[:, :s1], q1 - q0, s1, s0, b, self.device)
            with self.prompt_pass() if q1 - q0 > 1 else nullcontext():  # (a prompt's positions)
                h = srh.decode_hidden(z, fine_pos[:, q0:q1], mask, state.srh_cache, s0, s1, self.srh_rope,
                                      last_only=True)  # only the last position's logits are used
            logits = srh.lm_head(h[:, -1]).float()
            if self.speech_bias is not None:
                logits = logits + self.speech_bias
            if prosody is not None:
                logits = logits + prosody
            if follow is not None:
                logits = text_locked(logits, window(upcoming, started, 1)[:, 0], *follow, a_cfg.bos_token_id,
                                     a_cfg.eos_token_id)
            scores = process(logits, gen.sampling, counts if follow is None else None)
            tok = choose(scores, gen.sampling, noise=noise[:, j] if noise is not None else None)
            if counts is not None:
                counts.scatter_add_(1, tok[:, None], torch.ones_like(tok[:, None], dtype=counts.dtype))
            if tracer is not None:
                tracer.srh_logits.append(logits)
                tracer.srh_scores.append(scores)
                tracer.srh_tokens.append(tok)
            tokens.append(tok)
            started = started + is_start(tok).long()
            if follow is not None:
                follow = follow_on(tok, *follow[1:])
            embed = srh.embed(tok)
        state.srh_embed = embed
        return torch.stack(tokens, dim=1)  # [B, k]

    def _upcoming(self, state: DecodeState) -> torch.Tensor | None:
        """The pending-units view's units [B, width + k] from where the next speech group starts (rows without an
        answer yet: PAD), or None when the head has no such view."""
        if self.pending_view is None:
            return None
        n = self.pending_view.width + self.k
        rows = [a.upcoming(n) if a is not None else [PAD] * n for a in state.answers]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _follow_inputs(self, state: DecodeState, gen: GenerationConfig) -> tuple | None:
        """When the next speech group follows the text (gen.speech_follows_text and a pending-units view): per row
        the last code said [B], the tokens its unit has lasted [B], whether the answer's text has ended [B], the
        pace term [B] (`AnswerUnits.pace`) and where the hold prior starts for the unit being said and the next k
        [B, k + 1] (`AnswerUnits.hold_from`); else None."""
        if self.pending_view is None or not gen.speech_follows_text:
            return None
        rows = [(a.last, a.held, a.finished, a.pace, a.hold_from(self.k)) if a is not None else
                (-1, 0, False, 0.0, [HOLD_PRIOR_FROM] * (self.k + 1)) for a in state.answers]
        last, held, ended, pace, hold_from = zip(*rows)
        return (torch.tensor(last, device=self.device), torch.tensor(held, device=self.device),
                torch.tensor(ended, device=self.device), torch.tensor(pace, dtype=torch.float32, device=self.device),
                torch.tensor(hold_from, device=self.device))

    def units_ahead(self, state: DecodeState, gen: GenerationConfig, row: int = 0) -> list[int] | None:
        """The units row's speech will say after the one it is saying, where they are known: a head that says its
        text's units (the pending-units view, gen.speech_follows_text) knows them from the text
        (`AnswerUnits.ahead`); None otherwise. A streaming Piper detokenizer renders sooner with them."""
        if self.pending_view is None or not gen.speech_follows_text or state.answers is None:
            return None
        answer = state.answers[row]
        return answer.ahead() if answer is not None else None

    def _speech_noise(self, state: DecodeState, gen: GenerationConfig) -> torch.Tensor | None:
        """The sampling noise [B, k, Vs] of one speech group (None when greedy), one draw per position as
        `choose` draws it: the eager group and the compiled S2S step use the same draws, so they agree."""
        if not gen.do_sample:
            return None
        shape = (self.k, state.batch, self.cfg.audio_config.codebook_size)  # (position by position, as drawn)
        return exponential_noise(shape, state.generator, self.device).transpose(0, 1)

    # ------------------------------------------------------------------ one decode forward
    @torch.no_grad()
    def forward_step(self, state: DecodeState, gen: GenerationConfig, tracer: Tracer | None = None):
        """Feed `state.last_token` (fused with the last speech group where `state.fuse`) -> text logits, SRH group.

        Compiled, one graph runs the LLM position and the SRH's whole group, sampling included; eager, the LLM
        position, then the SRH positions one by one around the sampling. With a text lead L (`state.text_lead`, set
        by `lead_of` at the first step) the group is that of the LLM step L steps back (`state.lead`), and None for
        the first L steps after the prefill."""
        speech = state.srh_cache is not None
        lead = state.lead_in_force(gen)
        lagged = state.lead.pop(0) if speech and lead and len(state.lead) >= lead else None
        group = None
        # the prefill's LLM position of the forced opener, where this step runs the LLM alone on that opener
        prefilled, state.prefilled = state.prefilled, None
        if prefilled is not None and (lagged is not None or not lead or
                                      not bool((state.last_token == self.cfg.text_config.audio_bos_index).all())):
            prefilled = None  # (the step computes it again, over the same cache slot)
        if self.compiled is not None and speech and (lagged is not None or not lead):
            text_logits, group, now = self._fused_s2s_step(state, gen, tracer, lagged)
        else:
            hidden, text_embed, text_logits = prefilled or self._llm_position(state, speech)
            now = (hidden, text_embed, state.last_token, state.pos, state.slot)
            if speech and (lagged is not None or not lead):
                group = self._group_of(state, gen, tracer, *(lagged or now))
        if speech and lead:
            state.lead.append(now)
            if state.text_lead is None:
                self.lead_of(state, gen, now)
        state.slot += 1
        state.pos = state.pos + 1
        return text_logits, group

    def lead_of(self, state: DecodeState, gen: GenerationConfig, first: tuple) -> None:
        """Set the lead of an answer from its first decode step `first` (a `state.lead` entry; its input is the
        answer's opener, so the answer's style is known): rows whose prosody's rate bias is positive were asked to
        be fast (`AnswerUnits.rate_bias`) and get `gen.fast_text_lead` (`state.fast_rows`). Rows of one batch
        share one lead: a batch whose rows differ keeps `gen.text_lead` for all (the server gives such rows batches of
        their own)."""
        state.text_lead = gen.text_lead
        if self.model.audio_invert_tower.answer_prosody is None:
            return
        _, style = srh_input(self.model, *first[:3], state.answer_style)
        rate = self.model.audio_invert_tower.rate_bias(style[:, :self.cfg.text_config.hidden_size])  # [B]
        for answer, bias in zip(state.answers or [], rate.tolist()):  # (how the voice clock and hold prior treat it)
            if answer is not None:
                answer.rate_bias = bias
        if not gen.fast_text_lead:
            return
        state.fast_rows = (rate > 0) & ~state.finished
        if bool(state.fast_rows[~state.finished].all()):
            state.text_lead = gen.fast_text_lead

    def _group_of(self, state: DecodeState, gen: GenerationConfig, tracer: Tracer | None, hidden: torch.Tensor,
                  text_embed: torch.Tensor, token: torch.Tensor, pos: torch.Tensor, slot: int) -> torch.Tensor:
        """The speech group [B, k] of the LLM step at `slot`: its hidden state and text embedding [B, 1, D], input
        id [B] and position [B]."""
        k = self.k
        state.srh_key_valid[:, k * slot: k * slot + k] = True
        state.group_token = token
        u, state.answer_style = srh_input(self.model, hidden, text_embed, token, state.answer_style)
        fine = self.model.audio_invert_tower.ungroup(u)  # [B, k, D]
        fine_pos = pos[:, None] * k + torch.arange(k, device=self.device)
        return self._srh_group(state, fine, fine_pos, state.srh_embed, slot + 1, gen, tracer)

    def _llm_inputs(self, state: DecodeState, speech: bool) -> tuple:
        """The arguments of the compiled LLM position (CompiledDecoder._llm): it builds its input itself."""
        c = state.llm_cache
        return (state.last_token, state.last_group if speech else None, state.fuse, state.pos[:, None], c.k, c.v,
                torch.tensor([state.slot], device=self.device), state.key_valid)

    def _llm_position(self, state: DecodeState, speech: bool):
        """One LLM position at `state.slot` -> hidden [B, 1, D], its text embedding [B, 1, D], text logits [B, V]."""
        if self.compiled is not None:
            return self.compiled.llm(*self._llm_inputs(state, speech))
        m, slot = self.model, state.slot
        group = state.last_group if bool(state.fuse.any()) else None  # (skips the adapter when no row fuses)
        x, text_embed = step_input(m, state.last_token, group, state.fuse)
        state.key_valid[:, slot] = True
        mask = state.key_valid[:, None, None, : slot + 1] if state.padded else None
        hidden = m.language_model.model(x, state.pos[:, None], mask, state.llm_cache, slot, slot + 1, rope=self.rope)
        return hidden, text_embed, m.language_model.lm_head(hidden[:, -1]).float()

    def _fused_s2s_step(self, state: DecodeState, gen: GenerationConfig, tracer: Tracer | None,
                        lagged: tuple | None = None):
        """The compiled one-graph S2S step -> text logits [B, V], speech group [B, k], and this step's entry for
        `state.lead`. lagged: the `state.lead` entry whose group this step says (text_lead), else None (its own)."""
        srh, lag = state.srh_cache, None
        if lagged is not None:
            hidden, text_embed, token, pos, slot = lagged
            lag = (hidden, text_embed, token, pos[:, None], torch.tensor([slot], device=self.device))
        state.group_token = state.last_token if lagged is None else lagged[2]
        text_logits, logits, scores, group, state.srh_embed, state.answer_style, hidden, text_embed = \
            self.compiled.s2s(*self._llm_inputs(state, True), srh.k, srh.v, state.srh_key_valid, state.srh_embed,
                              state.answer_style, state.speech_counts, self._speech_noise(state, gen), gen.sampling,
                              self.speech_bias, self._upcoming(state), self._follow_inputs(state, gen), lag)
        if tracer is not None:
            for j in range(self.k):
                tracer.srh_logits.append(logits[:, j])
                tracer.srh_scores.append(scores[:, j])
                tracer.srh_tokens.append(group[:, j])
        return text_logits, group, (hidden, text_embed, state.last_token, state.pos, state.slot)

    # ------------------------------------------------------------------ token choice + speech bookkeeping
    def choose_step(self, state: DecodeState, text_logits: torch.Tensor, group: torch.Tensor | None,
                    gen: GenerationConfig, tracer: Tracer | None = None,
                    steps_left: list[int] | None = None) -> StepResult:
        """Choose this step's text ids, append the speech group and update the rows' bookkeeping. steps_left: per
        row, the steps it may still take after this one (default: gen.max_new_tokens less the steps taken; the
        server passes each row's own)."""
        t_cfg, a_cfg = self.cfg.text_config, self.cfg.audio_config
        if text_logits is None:  # (a prefill's, where the first id is forced and text greedy: `PrefillJob`)
            if not (gen.force_text_abos and gen.text_greedy and not state.tokens and tracer is None):
                raise ConfigError("text logits are needed unless the first id is forced, text greedy and not traced")
            scores, token = None, torch.full((state.batch,), t_cfg.audio_bos_index, device=self.device)
        elif gen.text_greedy:
            scores = text_logits
            token = scores.argmax(-1)
        else:
            scores = process(text_logits, gen.sampling, state.text_counts, self._banned(state, gen))
            token = choose(scores, gen.sampling, state.generator)
        if tracer is not None:
            tracer.text_logits.append(text_logits)
            tracer.text_scores.append(scores)
        if gen.force_text_abos and not state.tokens:
            token = torch.full_like(token, t_cfg.audio_bos_index)
        was_finished = state.finished
        token = torch.where(was_finished, torch.full_like(token, gen.pad_token_id), token)
        # speech mode starts on the row whose current input is <|audio_bos|> (released `generate_speech |= ...`)
        if state.last_token is None:
            state.active = state.prompt_ids[:, -1] == t_cfg.audio_bos_index
        else:
            state.active = state.active | (state.last_token == t_cfg.audio_bos_index)
        speaking = state.active & ~was_finished  # rows whose chosen text id belongs to their answer
        if gen.text_loop_stop:
            token = self._stop_loops(state, token, was_finished, gen)
        if gen.speech_holds_turn:
            if steps_left is None:
                steps_left = [gen.max_new_tokens - len(state.tokens) - 1] * state.batch
            token = self._hold_turn(state, token, speaking, gen, steps_left)
        if state.text_counts is not None:
            state.text_counts.scatter_add_(1, token[:, None], torch.ones_like(token[:, None], dtype=torch.int32))

        if group is not None:  # the SRH's speech mode: its group's step input opened an answer
            state.voicing = state.voicing | (state.group_token == t_cfg.audio_bos_index)
        appended = state.voicing & ~was_finished if group is not None else torch.zeros_like(state.active)
        ended = torch.zeros_like(appended)
        if group is not None and bool(appended.any()):
            ended = appended & (group == a_cfg.eos_token_id).any(-1)
            group = torch.where(ended[:, None], torch.full_like(group, a_cfg.eos_token_id), group)
            for row in appended.nonzero().flatten().tolist():
                state.speech[row].extend(group[row].tolist())
            state.last_group = torch.where(appended[:, None], group, state.last_group)
            if state.speech_counts is not None:
                state.speech_counts.scatter_add_(1, group, appended[:, None].int().expand_as(group))
            # the text id of the step where speech ends becomes <|audio_eos|> (as released)
            eos_tok = torch.full_like(token, t_cfg.audio_eos_index)
            if state.text_counts is not None and bool(ended.any()):
                state.text_counts.scatter_add_(1, token[:, None], -ended[:, None].int())
                state.text_counts.scatter_add_(1, eos_tok[:, None], ended[:, None].int())
            token = torch.where(ended, eos_tok, token)
            state.active, state.voicing = state.active & ~ended, state.voicing & ~ended
        state.fuse = appended & state.active
        if state.answers is not None:
            self._track_answers(state, token, group, speaking, appended)
        state.tokens.append(token)
        state.last_token = token
        stop = ended & self.turn_ends_with_speech if gen.speech_holds_turn else torch.zeros_like(was_finished)
        for e in gen.eos_ids:
            stop |= token == e
        state.finished = was_finished | stop
        if len(state.tokens) >= gen.max_new_tokens:
            state.finished = torch.ones_like(state.finished)
        return StepResult(token, group if bool(appended.any()) else None, appended, ended, state.finished)

    @staticmethod
    def _stop_loops(state: DecodeState, token: torch.Tensor, finished: torch.Tensor,
                    gen: GenerationConfig) -> torch.Tensor:
        """The chosen text ids [B], with the end of turn in place of the id that follows a loop: the row's last
        n * s ids are one span of s ids (2 <= s <= LOOP_SPAN) said n = gen.text_loop_stop times."""
        n, recent = gen.text_loop_stop, state.recent_text
        looped = torch.zeros_like(finished)
        for span in range(2, LOOP_SPAN + 1):  # every copy equals the one before it
            tail = recent[:, -n * span:]
            looped |= (tail[:, span:] == tail[:, :-span]).all(-1) & (tail[:, 0] >= 0)
        token = torch.where(looped & ~finished, torch.full_like(token, gen.eos_ids[0]), token)
        state.recent_text = torch.cat([recent[:, 1:], token[:, None]], dim=1)
        return token

    def _hold_turn(self, state: DecodeState, token: torch.Tensor, speaking: torch.Tensor,
                   gen: GenerationConfig, steps_left: list[int]) -> torch.Tensor:
        """The chosen text ids [B] with speaking rows kept to the format: <|sil|> or an end-of-turn id ends the
        row's text, and an ended text stays <|sil|> (until the speech ends: the caller then writes
        <|audio_eos|>). A row whose remaining steps would not let its speech say its text so far (a head with the
        pending-units view knows how many units are left) ends its text there, so the token limit cuts a spoken
        answer where its speech can still finish it, and the audio says what the text says."""
        sil = self.cfg.text_config.sil_index
        if state.text_ended is None:
            state.text_ended = torch.zeros_like(speaking)
        ends = token == sil
        for e in gen.eos_ids:
            ends |= token == e
        if state.answers is not None:
            lead = state.lead_in_force(gen)  # (the speech trails the text by it)
            short = [a is not None and left - lead <= a.steps_to_say(self.k)
                     for a, left in zip(state.answers, steps_left)]
            ends |= torch.tensor(short, device=token.device)
        state.text_ended = (state.text_ended | (speaking & ends)) & speaking
        return torch.where(state.text_ended, torch.full_like(token, sil), token)

    @staticmethod
    def _track_answers(state: DecodeState, token: torch.Tensor, group: torch.Tensor | None, speaking: torch.Tensor,
                       appended: torch.Tensor) -> None:
        """Give each row's AnswerUnits the text id it chose and the speech group it appended."""
        for row in speaking.nonzero().flatten().tolist():
            answer = state.answers[row]
            if answer is not None:
                answer.add_text(int(token[row]))
                if bool(appended[row]):
                    answer.add_speech(group[row].tolist())

    def _banned(self, state: DecodeState, gen: GenerationConfig) -> torch.Tensor | None:
        """Bad-word sequences: ban the last id of each sequence whose prefix ends the row's history."""
        if not gen.bad_words_ids:
            return None
        b, v = state.batch, self.cfg.text_config.vocab_size
        history = torch.cat([state.prompt_ids] + [t[:, None] for t in state.tokens], dim=1)
        banned = torch.zeros(b, v, dtype=torch.bool, device=self.device)
        for seq in gen.bad_words_ids:
            seq = list(seq)
            prefix = seq[:-1]
            if len(prefix) > history.shape[1]:
                continue
            hit = torch.ones(b, dtype=torch.bool, device=self.device)
            if prefix:
                hit = (history[:, -len(prefix):] == torch.tensor(prefix, device=self.device)).all(-1)
            banned[hit, seq[-1]] = True
        return banned

    # ------------------------------------------------------------------ loops
    def usable(self, gen: GenerationConfig) -> GenerationConfig:
        """`gen` as this model can run it: text only when it has no speech head."""
        if not gen.disable_speech and self.model.audio_invert_tower is None:
            return gen.with_(disable_speech=True, force_text_abos=False)
        if gen.text_lead and not gen.disable_speech and self.cfg.audio_config.speech_feedback:
            raise ConfigError("text_lead needs a model whose LLM does not read its own speech (audio_config."
                              "speech_feedback false): this one's next text depends on the speech not said yet")
        return gen

    def steps(self, prompt: Prompt, gen: GenerationConfig, tracer: Tracer | None = None,
              prefill: "PrefillJob | None" = None):
        """Yield (state, StepResult) for every generated step until all rows finish. `prefill`: a started prefill
        of `prompt` (`start_prefill` with `usable(gen)`, e.g. from cached keys and values) to finish instead of a
        whole one."""
        gen = self.usable(gen)
        if prefill is None:
            state, logits, group = self.prefill(prompt, gen, tracer)
        else:
            while not prefill.advance():
                pass
            state, logits, group = prefill.result
        result = self.choose_step(state, logits, group, gen, tracer)
        yield state, result
        while not state.done:
            logits, group = self.forward_step(state, gen, tracer)
            result = self.choose_step(state, logits, group, gen, tracer)
            yield state, result

    def generate(self, prompt: Prompt, gen: GenerationConfig, tracer: Tracer | None = None) -> "GenerationResult":
        t0 = time.perf_counter()
        state = None
        for state, _ in self.steps(prompt, gen, tracer):
            pass
        new = torch.stack(state.tokens, dim=1)  # [B, T]
        return GenerationResult(new, state.speech, torch.cat([state.prompt_ids, new], dim=1),
                                state.timings["prefill_s"], time.perf_counter() - t0)


@dataclass
class PrefixKV:
    """The LLM (and SRH) keys and values of a prompt's first positions, computed once (one row, no padding): a
    prompt that starts with the same ids copies them instead of computing them (`Engine.start_prefill(prefix=)`).
    Causal attention makes them independent of what follows; a prefix never reaches the prompt's last position."""

    ids: tuple
    llm_k: list          # per layer [1, Hkv, L, D]
    llm_v: list
    srh_k: list | None   # per SRH layer [1, Hkv, kL, D]; None when computed without speech
    srh_v: list | None

    def __len__(self) -> int:
        return len(self.ids)


class PrefillJob:
    """One prefill, run piece by piece: each `advance()` does the next piece and returns True once the prompt is in
    the cache; `result` then holds what `Engine.prefill` returns (state, last text logits, first speech group); the
    logits are None with `first_logits` false (and no tracer): where the first text id is forced and text greedy,
    nothing reads them (`Engine.start_prefill`), and their product over the vocabulary is skipped.

    The first call embeds the prompt and encodes its audio (and copies each row's `prefix` keys and values); each
    further call runs the next `chunk` positions (all the rest when `chunk` is None) through the LLM, and through
    the SRH with its start token as the first position of a group, as the whole prompt would (causal: a chunk's
    positions attend to the cached ones before them). Rows are left padded (`stack_prompts`); `prefix` is one
    PrefixKV or None per row (or one for a one-row prompt), each a proper prefix of its row; the chunks start at the
    earliest position no prefix covers, and the prompt's audio inputs (`Prompt.speech_ids`, features) are those of
    the `<|AUDIO|>` placeholders from there on: audio inside the prefixes is never encoded again. `save_prefix` =
    L > 0 ends a chunk after row 0's first L ids (row 0 must have no prefix) and keeps them in `saved_prefix`. Chunked
    and whole prefills compute the same function; floating-point sums may differ in the last bits (different matrix
    shapes).

    The forced opener (`Engine.fold_opener`): when the first text id is forced to `<|audio_bos|>` and the first decode
    step would run the LLM alone (a text lead, speech on), the last chunk also runs the LLM over that opener, one
    position past the prompt, and keeps its hidden state, text embedding and text logits in `state.prefilled`: the
    first decode step takes them instead of an LLM pass of its own (one step less before the first text and audio)."""

    def __init__(self, engine: Engine, prompt: Prompt, gen: GenerationConfig, tracer: Tracer | None = None,
                 chunk: int | None = None, prefix: "PrefixKV | list | None" = None, save_prefix: int = 0,
                 cache_len: int | None = None, first_logits: bool = True):
        self.engine, self.prompt, self.gen, self.tracer = engine, prompt, gen, tracer
        self.speech_on = not gen.disable_speech and engine.model.audio_invert_tower is not None
        self.b, self.p = prompt.input_ids.shape
        self.fold = engine.fold_opener and self.speech_on and gen.force_text_abos and gen.text_lead >= 1
        self.first_logits = first_logits or tracer is not None
        total = self.p + gen.max_new_tokens
        if total > engine.max_seq_len:
            raise ContextLengthError(f"prompt of {self.p} tokens + max_new_tokens {gen.max_new_tokens} = {total} "
                                     f"exceeds the context of {engine.max_seq_len} tokens; shorten the prompt or "
                                     f"history, or lower max_new_tokens")
        if chunk is not None and chunk < 1:
            raise ConfigError(f"prefill chunk must be >= 1, got {chunk}")
        mask = prompt.attention_mask
        self.pads = [0] * self.b if mask is None else [int(self.p - row.sum()) for row in mask]
        self.prefixes = prefix if isinstance(prefix, list) else [prefix] + [None] * (self.b - 1)
        if len(self.prefixes) != self.b:
            raise ConfigError(f"{len(self.prefixes)} prefixes for {self.b} prompt rows")
        starts = []
        for i, (pre, pad) in enumerate(zip(self.prefixes, self.pads)):
            n = len(pre) if pre is not None else 0
            if pre is not None and (not pad + n < self.p or
                                    tuple(prompt.input_ids[i, pad:pad + n].tolist()) != pre.ids):
                raise ConfigError(f"prompt row {i} does not start with its shared prefix (or is no longer)")
            if pre is not None and self.speech_on and pre.srh_k is None:
                raise ConfigError("this prefix was computed without the speech head")
            starts.append(pad + n)
        self.save_at = 0
        if save_prefix:
            if self.prefixes[0] is not None or not self.pads[0] + save_prefix < self.p:
                raise ConfigError("save_prefix needs row 0 without a prefix and longer than it")
            self.save_at = self.pads[0] + save_prefix
        self.chunk = chunk
        self.cache_len = cache_len if cache_len is not None else total
        self.next = min(starts)        # first prompt position not in the cache yet (after _start)
        self.bos = self.prompt_bos = None  # the SRH's start-token embedding (+ the empty pending view for prompts)
        self.cached = self.next        # leading positions copied from prefixes (in every row), not computed
        self.state: DecodeState | None = None
        self.result = None
        self.saved_prefix: PrefixKV | None = None
        self.seconds = 0.0             # compute time so far

    @torch.no_grad()
    def advance(self) -> bool:
        t0 = time.perf_counter()
        if self.state is None:
            self._start()
        else:
            self._chunk()
        self.seconds += time.perf_counter() - t0
        if self.result is not None:
            self.state.timings["prefill_s"] = self.seconds
        return self.result is not None

    def _start(self) -> None:
        eng, m, prompt, gen, k, b, p = self.engine, self.engine.model, self.prompt, self.gen, self.engine.k, \
            self.b, self.p
        dev, t_cfg = eng.device, eng.cfg.text_config
        ids = prompt.input_ids.to(dev)
        mask2d = (prompt.attention_mask if prompt.attention_mask is not None else torch.ones_like(ids)).to(dev)
        self.ids, self.openers, self.mask = ids, m.prompt_openers(ids), mask2d
        self.text_embeds = m.embed_inputs(ids, self.openers)  # [B, P, D]; the SRH input adds these too
        embeds = self.text_embeds
        if prompt.speech_ids is not None and prompt.speech_ids.numel() > 0:
            with eng.prompt_pass():
                audio = m.encode_audio(prompt.speech_ids.to(dev), prompt.speech_attention_mask.to(dev),
                                       _opt(prompt.input_features, dev, eng.dtype),
                                       _opt(prompt.feature_attention_mask, dev), _opt(prompt.feature_exist_mask, dev))
            if prompt.audio_groups is not None:  # audios encoded ahead (IncrementalAudio): their vectors as given
                audio.features = audio.features.clone()
                for row, groups in enumerate(prompt.audio_groups):
                    if groups is not None:
                        audio.features[row, : groups.shape[0]] = groups.to(audio.features)
            cut = self.next  # the prompt's audios are those of the placeholders no prefix covers
            embeds = torch.cat([embeds[:, :cut], m.merge_audio(ids[:, cut:], embeds[:, cut:], audio)], dim=1)
        self.embeds = embeds
        if self.tracer is not None:
            self.tracer.prefill_embeds = embeds
        self.pos = (mask2d.long().cumsum(-1) - 1).clamp(min=0)  # [B, P]
        total = self.cache_len
        if eng.compiled is not None:  # compiled graphs are specialised on the cache size: round it up
            total = min(-(-total // CACHE_BUCKET) * CACHE_BUCKET, eng.max_seq_len)
        total = max(total, p)
        llm_cache = KVCache(t_cfg, b, total, eng.dtype, dev)
        key_valid = torch.zeros(b, total, dtype=torch.bool, device=dev)
        key_valid[:, :p] = mask2d.bool()
        state = DecodeState(llm_cache, None, key_valid, torch.zeros(0), self.pos[:, -1] + 1, p, ids,
                            padded=not bool(mask2d.bool().all()), speech=[[] for _ in range(b)])
        state.last_group = torch.full((b, k), eng.cfg.audio_config.pad_token_id, device=dev)
        state.fuse = torch.zeros(b, dtype=torch.bool, device=dev)
        state.active = torch.zeros(b, dtype=torch.bool, device=dev)
        state.voicing = torch.zeros(b, dtype=torch.bool, device=dev)
        state.finished = torch.zeros(b, dtype=torch.bool, device=dev)
        if gen.seed is not None:
            state.generator = torch.Generator(device=dev).manual_seed(gen.seed)
        if gen.text_loop_stop:
            state.recent_text = torch.full((b, gen.text_loop_stop * LOOP_SPAN), -1, device=dev)
        if gen.repetition_penalty != 1.0:
            state.text_counts = torch.zeros(b, t_cfg.vocab_size, dtype=torch.int32, device=dev)
            state.text_counts.scatter_add_(1, ids, mask2d.int())
        if self.speech_on:
            srh_cfg = eng.cfg.audio_config.crq_transformer_config
            state.srh_cache = KVCache(srh_cfg, b, k * total, eng.dtype, dev)
            state.srh_key_valid = key_valid.repeat_interleave(k, dim=1)
            if gen.repetition_penalty != 1.0:
                state.speech_counts = torch.zeros(b, eng.cfg.audio_config.codebook_size, dtype=torch.int32,
                                                  device=dev)
            srh = m.audio_invert_tower
            if srh.answer_style is not None:  # (no answer is open before the prompt)
                cue = srh.answer_cue is not None  # (its running sum is kept in float32)
                state.answer_style = torch.zeros(b, m.answer_state_size(), dtype=torch.float32 if cue else eng.dtype,
                                                 device=dev)
                if cue and self.next:  # the cue counts the positions copied from prefixes too (from their ids)
                    d = eng.cfg.text_config.hidden_size
                    state.answer_style[:, d:] = m.answer_cue_after(ids[:, :self.next], mask2d[:, :self.next])
            self.bos = self.prompt_bos = srh.embed(torch.full((b,), eng.cfg.audio_config.bos_token_id, device=dev))
            if eng.pending_view is not None:  # (the prompt's fine positions see no units pending)
                state.answers = [eng.pending_view.answer() for _ in range(b)]
                self.prompt_bos = self.bos + srh.pending_view(torch.full((1, srh.pending_width), PAD, device=dev))
        for i, (pre, pad) in enumerate(zip(self.prefixes, self.pads)):  # copy-on-start: shared prefixes
            if pre is None:
                continue
            n = len(pre)
            for dst, src in ((llm_cache.k, pre.llm_k), (llm_cache.v, pre.llm_v)):
                for layer_dst, layer_src in zip(dst, src):
                    layer_dst[i, :, pad:pad + n] = layer_src[0]
            if self.speech_on:
                for dst, src in ((state.srh_cache.k, pre.srh_k), (state.srh_cache.v, pre.srh_v)):
                    for layer_dst, layer_src in zip(dst, src):
                        layer_dst[i, :, k * pad:k * (pad + n)] = layer_src[0]
        self.state = state

    def _chunk(self) -> None:
        eng, m, state, k, b, p = self.engine, self.engine.model, self.state, self.engine.k, self.b, self.p
        dev = eng.device
        a = self.next
        end = p if self.chunk is None else min(p, a + self.chunk)
        if a < self.save_at:
            end = min(end, self.save_at)
        last = end == p
        embeds, pos, stop = self.embeds[:, a:end], self.pos[:, a:end], end
        if last and self.fold:  # the forced opener, one position past the prompt (see the class doc)
            opener = torch.full((b,), eng.cfg.text_config.audio_bos_index, device=dev)
            opener_embed, _ = step_input(m, opener, None, state.fuse)
            embeds, pos, stop = torch.cat([embeds, opener_embed], 1), torch.cat([pos, state.pos[:, None]], 1), p + 1
            state.key_valid[:, p] = True
        mask = attention_mask_4d(state.key_valid[:, :stop], stop - a, stop, a, b, dev)
        # the SRH reads every prompt position's hidden state; without it only the last one is used
        with eng.prompt_pass():
            hidden = m.language_model.model(embeds, pos, mask, state.llm_cache, a, stop, rope=eng.rope,
                                             last_only=not self.speech_on)
        if stop > end:  # [B, 1, D] of the opener, its text embedding and its text logits, for the first step
            state.prefilled = (hidden[:, -1:], opener_embed, m.language_model.lm_head(hidden[:, -1]).float())
            hidden = hidden[:, :-1]
        group = None
        if self.speech_on:
            srh = m.audio_invert_tower
            u = hidden + self.text_embeds[:, a:end]
            if srh.answer_style is not None:
                styles, state.answer_style = m.answer_styles(hidden, self.ids[:, a:end], self.openers[:, a:end],
                                                             state.answer_style, mask=self.mask[:, a:end])
                u = u + styles
            with eng.prompt_pass():
                fine = srh.ungroup(u)  # [B, k(end-a), D]
            fine_pos = (self.pos[:, a:end, None] * k + torch.arange(k, device=dev)).reshape(b, k * (end - a))
            if last:  # (with a text lead too: what its view would add to this group, before any answer, is nothing)
                state.group_token = self.ids[:, -1]
                group = eng._srh_group(state, fine, fine_pos, self.bos, p, self.gen, self.tracer)
            else:  # these fine positions all start a group: the SRH's start token, as in the last chunk's first pass
                s0, s1 = k * a, k * end
                srh_mask = attention_mask_4d(state.srh_key_valid[:, :s1], s1 - s0, s1, s0, b, dev)
                with eng.prompt_pass():
                    srh.decode_hidden(fine + self.prompt_bos[:, None], fine_pos, srh_mask, state.srh_cache, s0, s1,
                                      eng.srh_rope, last_only=True)
        self.next = end
        if end == self.save_at:
            self.saved_prefix = self._snapshot(self.pads[0], end)
        if last:
            logits = m.language_model.lm_head(hidden[:, -1]).float() if self.first_logits else None
            self.result = (state, logits, group)
            # (the job may be kept a little longer than needed)
            self.embeds = self.text_embeds = self.ids = self.openers = self.mask = None

    def _snapshot(self, a: int, b: int) -> PrefixKV:
        """Row 0's positions [a, b) (its ids after its left padding) as a PrefixKV."""
        ids = tuple(self.prompt.input_ids[0, a:b].tolist())
        return cached_prefix(self.state, ids, a, self.engine.k, clone=True)


def cached_prefix(state: DecodeState, ids: tuple, start: int, k: int, clone: bool = False) -> PrefixKV:
    """Row 0's cache slots [start, start + len(ids)) as the PrefixKV of `ids`: copies, or views (`clone=False`:
    for a state whose caches are written no more, e.g. a finished turn's)."""
    a, b = start, start + len(ids)
    srh = state.srh_cache

    def part(xs, lo, hi):
        return [x[:1, :, lo:hi].clone() if clone else x[:1, :, lo:hi] for x in xs]

    return PrefixKV(ids, part(state.llm_cache.k, a, b), part(state.llm_cache.v, a, b),
                    part(srh.k, k * a, k * b) if srh is not None else None,
                    part(srh.v, k * a, k * b) if srh is not None else None)


def _check_decode_weights(kind: str, compile: bool, device: torch.device, dtype: torch.dtype, quantized: bool):
    if kind not in DECODE_WEIGHTS:
        raise ConfigError(f"decode weights must be one of {', '.join(DECODE_WEIGHTS)}, got {kind!r}")
    if kind == "fp16" and not (compile and device.type == "cpu" and dtype == torch.float32 and not quantized):
        raise ConfigError("fp16 decode weights are read by compiled CPU decoding of an fp32 model only (--compile, "
                          f"--device cpu, --dtype fp32); this engine: compile={compile}, device {device}, "
                          f"{'int8' if quantized else str(dtype).removeprefix('torch.')}")


def _weight_layout(model: torch.nn.Module, column_major: bool) -> None:
    """Store every Linear weight [out, in] column-major (its transpose contiguous) or row-major, in place, ties kept.

    Decoding multiplies one row vector by every weight. Eager decoding calls MKL, whose x @ W^T runs 1.5-3x slower
    on CPU for a row-major W than for a column-major one; compiled decoding reduces products itself, fastest over
    contiguous rows (bench/matvec.py). Larger batches (prefill) do not care.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight.data
            if column_major and w.stride(0) != 1:
                m.weight.data = w.t().contiguous().t()
            elif not column_major and not w.is_contiguous():
                m.weight.data = w.contiguous()


@dataclass
class GenerationResult:
    new_text_ids: torch.Tensor       # [B, T]
    speech_ids: list[list[int]]      # per row, groups of k (speech EOS group included)
    sequences: torch.Tensor          # [B, P+T]
    prefill_s: float
    total_s: float


def _opt(x, device, dtype=None):
    if x is None:
        return None
    return x.to(device=device, dtype=dtype) if dtype is not None and x.is_floating_point() else x.to(device)

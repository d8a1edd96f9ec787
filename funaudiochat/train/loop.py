"""The training loop of every stage (pre-alignment, Core-Cocktail stages, multi-task DPO, the mini's word reader),
on one process or on many under torchrun (FSDP2 or DDP). A `Trainer` follows torchtune's setup / train /
save_checkpoint shape and nanoGPT's plain loop: fetch this process's micro-batches of the step, forward + backward
each (gradients sync on the last), clip, step, log, checkpoint.

Exactness: the global batch of a step is fixed by (seed, step), losses are normalised by the target counts of the
whole global batch, and checkpoints hold full fp32 weights, the optimizer state and every process's RNG state; so
1 process and N processes see the same losses (up to float summation order), and a resumed run continues bit for
bit where it stopped (on CPU; GPU kernels may not be deterministic).
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset

from funaudiochat import fileio
from funaudiochat.config import FunAudioChatConfig
from funaudiochat.errors import CheckpointError, ConfigError
from funaudiochat.model import presets
from funaudiochat.model.checkpoint import (load_model, load_state_dict_checked, materialize_buffers,
                                           read_state_dict)
from funaudiochat.model import lora
from funaudiochat.model.adapter import regroup_continuous_weight
from funaudiochat.model.funaudiochat import FunAudioChatModel
from funaudiochat.model.word_reader import WordReaderConfig
from funaudiochat.text.tokenizer import TextTokenizer
from funaudiochat.train import checkpoint as ckpt
from funaudiochat.train import parallel
from funaudiochat.train.batching import Collator, DistillCollator, EpochPlan, split_global_batch
from funaudiochat.train.config import DPO_TASKS, Recipe, resolve_precision
from funaudiochat.train.data import DataReport, DistillItem, SampleBuilder, load_records
from funaudiochat.train.losses import GlobalCounts, distill_kl, dpo_loss, sequence_logps, sft_loss
from funaudiochat.train.metrics import MetricsLog
from funaudiochat.train.optim import build_optimizer, lr_at, select_trainable, set_lr
from funaudiochat.train.reader_data import IGNORE, ReaderCollator, load_reader_clips

log = logging.getLogger(__name__)


class StepData(Dataset):
    """Item `step` = this process's micro-batches of that optimizer step (collated; audio loaded, log-mel done)."""

    def __init__(self, items: list, plan: EpochPlan, collate, info: parallel.DistInfo, accum: int, stage: str):
        self.items, self.plan, self.collate, self.info = items, plan, collate, info
        self.accum, self.stage = accum, stage

    def __getitem__(self, step: int) -> list:
        micro = split_global_batch(self.plan.step(step), self.plan.lengths, self.info.rank, self.info.world,
                                   self.accum)
        if self.stage == "reader":  # its collate roughens the clips as (seed, step, micro-batch) draws
            return [self.collate([self.items[i] for i in m], (step, j)) for j, m in enumerate(micro)]
        if self.stage != "dpo":
            return [self.collate([self.items[i] for i in m]) for m in micro]
        out = []
        for m in micro:
            pairs = [self.items[i] for i in m]
            out.append((self.collate([p.chosen for p in pairs] + [p.rejected for p in pairs]),
                        [p.task for p in pairs]))
        return out


class Trainer:
    def __init__(self, recipe: Recipe, resume: bool = False):
        self.recipe, self.resume = recipe, resume
        self.info = parallel.init_distributed()
        self.run_dir = Path(recipe.run_dir)
        self.start_step = 0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        r, info = self.recipe, self.info
        _seed_everything(r.train.seed, r.train.deterministic)
        resume_dir = self._resume_dir()
        start_source = Path(r.model.checkpoint) if r.model.checkpoint else None
        source = resume_dir / "model" if resume_dir else start_source
        self.cfg = FunAudioChatConfig.load(source) if source else _preset_config(r)
        if r.model.group_size:
            self.cfg.audio_config.group_size = r.model.group_size
        if r.model.continuous_grouping:
            self.cfg.audio_config.continuous_grouping = r.model.continuous_grouping
        if r.model.srh_token_scale:
            self.cfg.audio_config.srh_token_scale = r.model.srh_token_scale
        for name in ("srh_pending_units", "speech_feedback", "speech_opener", "srh_answer_style", "srh_answer_cue",
                     "srh_answer_prosody", "srh_blind_gain", "srh_level_scale"):
            if getattr(r.model, name) is not None:  # the recipe's setting over the starting model's
                setattr(self.cfg.audio_config, name, getattr(r.model, name))
        if r.model.reader_slot_rate is not None:
            reader = self.cfg.audio_config.word_reader
            if reader is None:
                raise ConfigError(f"model.reader_slot_rate: {source or 'the preset'} has no word reader")
            reader = {**reader, "slot_rate": r.model.reader_slot_rate}
            WordReaderConfig.from_dict(reader, "word_reader (model.reader_slot_rate)")  # validated before any data is read
            self.cfg.audio_config.word_reader = reader
        self.tokenizer_path = _tokenizer_path(r)
        self.tokenizer = TextTokenizer.from_file(self.tokenizer_path)
        self._setup_data()
        self.model = self._build_model(source, trainable=True, fresh=resume_dir is None)
        self.optimizer = build_optimizer(self.model, r.optim)
        self.ref_model = None
        if r.stage == "dpo":
            ref = Path(r.dpo.reference) if r.dpo.reference else start_source
            self.ref_model = self._build_model(ref, trainable=False)
        if r.distill.teacher:
            self.ref_model = self._teacher(Path(r.distill.teacher))
        if resume_dir:
            self._load_training_state(resume_dir)
        self.metrics = MetricsLog(self.run_dir, info.main, self.start_step, r.log.tensorboard)
        # every process reports itself, and the metrics record how many took part in a collective
        self.precision = resolve_precision(r.train.precision, info.device)
        log.info("process %d of %d (%s) on %s, %s", info.rank, info.world,
                 r.dist.strategy if info.enabled else "no torchrun", info.device, self.precision)
        self.processes = int(parallel.all_reduce_sum(torch.ones(1), info).item())
        if info.main:
            fileio.write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(r.to_dict(), sort_keys=False))

    def _teacher(self, path: Path) -> FunAudioChatModel:
        """The distillation teacher, as saved (its own config: it only reads text), frozen, on every process."""
        teacher = load_model(path, dtype=torch.float32)
        mine, theirs = self.cfg.text_config.vocab_size, teacher.cfg.text_config.vocab_size
        if mine != theirs:
            raise ConfigError(f"distill.teacher: {path} has a text vocabulary of {theirs}, the student {mine}: "
                              f"the KL needs the same vocabulary")
        return teacher.requires_grad_(False).eval().to(self.info.device)

    def _resume_dir(self) -> Path | None:
        if self.info.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(self.run_dir)
        parallel.barrier(self.info)
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is not None and not self.resume:
            raise ConfigError(f"{self.run_dir} already holds checkpoints (latest {latest.name}): pass --resume to "
                              f"continue that run, or set run_dir to a new folder")
        if self.resume and latest is None and self.info.main:
            log.info("--resume: no checkpoint in %s yet, starting from step 0", self.run_dir)
        return latest

    def _setup_data(self) -> None:
        r, info = self.recipe, self.info
        if r.stage == "reader":
            self.items, report = self._reader_clips()
        else:
            builder = SampleBuilder(self.tokenizer, self.cfg, r.data.max_len)
            build = builder.pair if r.stage == "dpo" else builder.distill_item if r.distill.teacher else builder.sample
            self.items, report = load_records(r.data.train, build, r.data.on_error)
            if r.distill.teacher:
                self._add_typed_twins()
        if info.main:
            _log_report(report, self.run_dir)
        self.plan = EpochPlan([len(x) for x in self.items], r.train.global_batch, r.train.seed,
                              r.data.bucket_batches)
        per_step = r.train.micro_batch * info.world
        if r.train.global_batch % per_step:
            raise ConfigError(f"train.global_batch={r.train.global_batch} must be a multiple of train.micro_batch "
                              f"({r.train.micro_batch}) x processes ({info.world})")
        self.accum = r.train.global_batch // per_step
        self.total_steps = r.train.steps or r.train.epochs * self.plan.batches_per_epoch
        self.collate = Collator(self.cfg, r.data.max_len, r.data.packing) if r.stage != "reader" else \
            ReaderCollator(self.cfg.audio_config.num_mel_bins, self.reader_cfg, r.reader, r.train.seed)
        if r.distill.teacher:
            self.collate = DistillCollator(self.collate)
        self.tasks = sorted({p.task for p in self.items}) if r.stage == "dpo" else []
        other = sorted(set(self.tasks) - set(DPO_TASKS))
        if other and info.main:
            log.info("DPO task tags besides the paper's %s: %s (metrics are logged per tag)", DPO_TASKS, other)

    def _add_typed_twins(self) -> None:
        """Distillation: check there is something to distill; with `distill.typed_students`, each typed twin joins
        the items as a record of its own (its own twin)."""
        r = self.recipe
        twins = [it.typed for it in self.items if it.typed is not None]
        if not twins:
            raise ConfigError(f"distill.teacher: none of the {len(self.items)} records has a typed twin (spoken user "
                              f"turns with their scripts, text answers): nothing to distill")
        if self.info.main:
            log.info("distillation: %d of %d records have a typed twin for %s%s", len(twins), len(self.items),
                     r.distill.teacher, ", each also read typed by the student" if r.distill.typed_students else "")
        if r.distill.typed_students:
            self.items += [DistillItem(t, t) for t in twins]

    def _reader_clips(self) -> tuple[list, DataReport]:
        """Stage `reader`: the records' user clips and their scripts in Whisper's tokens (train/reader_data.py)."""
        import tokenizers

        from funaudiochat.assets.whisper_encoder import whisper_model_dir

        settings = self.cfg.audio_config.word_reader
        if settings is None:
            raise ConfigError(f"stage reader: {self.recipe.model.checkpoint or 'the preset'} has no word reader "
                              f"(start from `assets smollm2 --word-reader` or a model built from it)")
        if self.info.world > 1:
            raise ConfigError("stage reader runs on one process (Whisper tiny trains in minutes on one CPU): launch "
                              "it without torchrun")
        self.reader_cfg = WordReaderConfig.from_dict(settings)
        tokenizer = tokenizers.Tokenizer.from_file(str(whisper_model_dir() / "tokenizer.json"))
        return load_reader_clips(self.recipe.data.train, self.reader_cfg, tokenizer, self.recipe.data.on_error)

    def _build_model(self, source: Path | None, trainable: bool, fresh: bool = False) -> torch.nn.Module:
        """Plain / DDP: every process holds the whole model. FSDP2: rank 0 reads the full weights, the others
        build on the meta device; all shard, then rank 0's weights are broadcast into the shards. `fresh`: the
        starting weights of a new run (`model.speech_embeddings_at_start` applies)."""
        r, info = self.recipe, self.info
        fsdp = info.enabled and r.dist.strategy == "fsdp"
        live_adapters = trainable and bool(r.lora.rank)  # a resumed LoRA run takes them back as parameters
        full = self._full_model(source, live_adapters) if info.main or not fsdp else None
        if full is not None and fresh and r.model.speech_embeddings_at_start == "piper-factorized":
            _piper_factorized_speech_embeddings(full, r.train.seed)
        if fsdp:
            with torch.device("meta"):
                model = FunAudioChatModel(self.cfg)
        else:
            model = full
        if trainable and r.lora.rank:
            self._attach_lora(model, full, source)
        if trainable:
            n, total = select_trainable(model, r.train.trainable, r.train.frozen)
            if r.lora.rank:
                n = _train_adapters_not_llm(model)
            # a stage that trains the LLM's own weights invalidates the LoRA delta it started from
            self.llm_dense_trained = any(p.requires_grad for k, p in model.named_parameters()
                                         if k.startswith(lora.LLM_PREFIX) and not lora.is_adapter(k))
            # checkpoints of this stage record the parts it trains (config.json `trained`, read by inference)
            self.cfg.mark_trained(k for k, p in model.named_parameters(remove_duplicate=False) if p.requires_grad)
            self.srh_trains = any(p.requires_grad for k, p in model.named_parameters() if "audio_invert_tower" in k)
            model.audio_tower.detach_fed_back_speech = r.train.speech_embedding_grad == "head"
            model.text_stream_targets = r.train.text_stream_targets
            if info.main:
                log.info("training %.2fM of %.2fM parameters", n / 1e6, total / 1e6)
            if r.train.activation_checkpointing:
                parallel.apply_activation_checkpointing(model)
        else:
            model.requires_grad_(False)
        if fsdp:
            parallel.shard_fsdp(model, info)
            model.to_empty(device=info.device)
            materialize_buffers(model)
            _buffers_to(model, info.device)
            parallel.load_model_state(model, full.state_dict() if full is not None else {}, info)
        else:
            model.to(info.device)
            if info.enabled and trainable:
                model = parallel.wrap_ddp(model, info)
        return model.train(trainable)

    def _attach_lora(self, model: torch.nn.Module, full: torch.nn.Module | None, source: Path | None) -> None:
        """LoRA on the LLM (recipe `lora`); a resumed run takes back its adapters from the step's model folder."""
        r = self.recipe
        if full is not None and full is not model:
            lora.attach(full, r.lora.rank, r.lora.alpha, r.lora.targets)
        names = lora.attach(model, r.lora.rank, r.lora.alpha, r.lora.targets)
        if full is not None and source is not None and lora.load_adapters(full, source) and self.info.main:
            log.info("LoRA adapters read back from %s", source)
        if self.info.main:
            log.info("LoRA rank %d (alpha %g) on %d linear layers of the LLM", r.lora.rank, r.lora.alpha, len(names))

    def _full_model(self, source: Path | None, live_adapters: bool) -> FunAudioChatModel:
        if source is not None:
            a, src = self.cfg.audio_config, FunAudioChatConfig.load(source).audio_config
            settings = ("group_size", "continuous_grouping", "srh_pending_units", "speech_opener", "srh_answer_style",
                        "srh_answer_cue", "srh_answer_prosody")
            if any(getattr(src, name) != getattr(a, name) for name in settings):
                return _regrouped_model(source, self.cfg, self.recipe, fold_adapters=not live_adapters)
            # built with the run's config: the recipe's settings (model.srh_token_scale) apply to the loaded weights
            return load_model(source, dtype=torch.float32, fold_adapters=not live_adapters, cfg=self.cfg)
        torch.manual_seed(self.recipe.train.seed)
        model = FunAudioChatModel(self.cfg)
        model.init_weights(self.recipe.model.init_std)
        return model

    def _load_training_state(self, step_dir: Path) -> None:
        state = ckpt.read_trainer_state(step_dir)
        if state.get("data_fingerprint") != self.plan.fingerprint():
            raise CheckpointError(f"{step_dir}: the training data changed since this checkpoint (fingerprint "
                                  f"{state.get('data_fingerprint')} vs {self.plan.fingerprint()}); resume with the "
                                  f"same data files, or start a new run_dir")
        optim = ckpt.read_optimizer_state(step_dir) if self.info.main else {}
        parallel.load_optimizer_state(self.model, self.optimizer, optim, self.info)
        rng = ckpt.read_rng_state(step_dir, self.info.rank)
        if rng is not None:
            ckpt.set_rng_state(rng)
        self.start_step = int(state["step"])
        if self.info.main:
            log.info("resumed from %s (step %d of %d)", step_dir, self.start_step, self.total_steps)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        r, info = self.recipe, self.info
        data = StepData(self.items, self.plan, self.collate, info, self.accum, r.stage)
        step_of = {"sft": self._sft_step, "dpo": self._dpo_step, "reader": self._reader_step}[r.stage]
        loader = DataLoader(data, batch_size=None, sampler=range(self.start_step, self.total_steps),
                            num_workers=r.data.num_workers)
        bar = _progress(r, info, self.start_step, self.total_steps)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for step, micro in zip(range(self.start_step, self.total_steps), loader):
            t0 = time.perf_counter()
            lr = lr_at(step, self.total_steps, r.optim)
            set_lr(self.optimizer, lr)
            stats = step_of(micro)
            for p in params:  # no gradient in this step (e.g. no user audio): step on zeros, as FSDP2 and ZeRO do
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            norm = torch.nn.utils.clip_grad_norm_(params, r.optim.grad_clip or float("inf"))
            if isinstance(norm, DTensor):  # FSDP2: a partial norm over the shards
                norm = norm.full_tensor()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            done = step + 1
            stats.update(lr=lr, grad_norm=float(norm), processes=self.processes,
                         step_time=elapsed, tokens_per_s=stats["tokens"] / elapsed)
            if done % r.log.every == 0 or done == self.total_steps:
                self.metrics.write(done, stats)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{stats['tokens_per_s']:.0f}")
            if r.checkpoint.every and done % r.checkpoint.every == 0 and done < self.total_steps:
                self.save_checkpoint(done)
        if bar is not None:
            bar.close()
        self.save_checkpoint(self.total_steps, export=r.checkpoint.export)

    def runs_srh(self, batch) -> bool:
        """Whether a training forward needs the SRH: it trains, or the batch has speech targets (a frozen SRH without
        targets adds nothing to the loss or the gradients)."""
        return self.srh_trains or batch.n_speech_targets > 0

    def _autocast(self):
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def _sft_step(self, micro: list) -> dict:
        info, world = self.info, self.info.world
        counts = parallel.all_reduce_sum(torch.tensor([sum(b.n_text_targets for b in micro),
                                                       sum(b.n_speech_targets for b in micro),
                                                       len(micro), sum(b.n_tokens for b in micro)],
                                                      dtype=torch.float64), info).tolist()
        total = GlobalCounts(int(counts[0]), int(counts[1]), int(counts[2]))
        aux_coef = self.cfg.text_config.router_aux_loss_coef
        sums = torch.zeros(5, dtype=torch.float64)  # text, speech, aux, KL sums; distilled targets
        for j, b in enumerate(micro):
            teacher = self._teacher_targets(b)
            with parallel.gradient_sync(self.model, j == len(micro) - 1):
                with self._autocast():
                    trace: dict | None = {} if teacher is not None else None  # the rewritten labels, for the KL
                    out = self.model(**b.model_inputs(info.device), text_logits="targets", speech=self.runs_srh(b),
                                     trace=trace)
                    loss, parts = sft_loss(out, b.n_text_targets, b.n_speech_targets, total, aux_coef)
                kl, n_kl = torch.zeros(()), 0
                if teacher is not None:
                    owners = _target_owners(b.owners, trace["lm_labels"], self.cfg.ignore_index)
                    kl, n_kl = distill_kl(out.text_logits, owners, *teacher)
                    loss = loss + self.recipe.distill.weight * kl / max(total.text, 1)
                (loss * world).backward()  # the gradient reduction averages over processes
            sums += torch.stack([parts["text_sum"].double().cpu(), parts["speech_sum"].double().cpu(),
                                 parts["aux_sum"].double().cpu(), kl.detach().double().cpu(),
                                 torch.tensor(float(n_kl), dtype=torch.float64)])
        text, speech, aux, kl, n_kl = parallel.all_reduce_sum(sums, info).tolist()
        stats = {"text_loss": text / max(total.text, 1), "speech_loss": speech / max(total.speech, 1)}
        stats["loss"] = stats["text_loss"] + stats["speech_loss"]
        if self.recipe.distill.teacher:
            stats["distill_kl"] = kl / max(n_kl, 1)  # per distilled target
            stats["loss"] += self.recipe.distill.weight * kl / max(total.text, 1)
        if self.cfg.text_config.output_router_logits:
            stats["aux_loss"] = aux / total.micro_batches
            stats["loss"] += aux_coef * stats["aux_loss"]
        stats["tokens"] = int(counts[3])
        return stats

    def _teacher_targets(self, b) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Distillation: the teacher's logits at its text targets of the batch's typed twins, and their owners."""
        if b.teacher is None:
            return None
        with torch.no_grad(), self._autocast():
            trace: dict = {}
            out = self.ref_model(**b.teacher.model_inputs(self.info.device), text_logits="targets", speech=False,
                                 trace=trace)
        return out.text_logits, _target_owners(b.teacher.owners, trace["lm_labels"], self.cfg.ignore_index)

    def _reader_step(self, micro: list) -> dict:
        """Stage `reader`: Whisper's cross-entropy on each clip's script, averaged over the step's target tokens."""
        device, n = self.info.device, sum(b.n_targets for b in micro)
        total = 0.0
        for b in micro:
            with self._autocast():
                logits = self.model.reader_logits(b.features.to(device), b.lengths.to(device), b.inputs.to(device))
            loss = F.cross_entropy(logits.flatten(0, 1).float(), b.targets.flatten().to(device),
                                   ignore_index=IGNORE, reduction="sum")
            (loss / max(n, 1)).backward()
            total += float(loss.detach())
        return {"loss": total / max(n, 1), "tokens": n}

    def _dpo_step(self, micro: list) -> dict:
        info, world, beta = self.info, self.info.world, self.recipe.dpo.beta
        k = self.cfg.audio_config.group_size
        n_pairs = int(parallel.all_reduce_sum(torch.tensor([float(sum(len(t) for _, t in micro))]), info).item())
        # per task: pairs, sum of reward margins, correctly ranked pairs; row -1: the loss sum
        tally = torch.zeros(len(self.tasks) + 1, 3, dtype=torch.float64)
        tokens = 0
        for j, (b, tasks) in enumerate(micro):
            inputs, n = b.model_inputs(info.device), len(tasks)
            with torch.no_grad(), self._autocast():
                ref_trace: dict = {}
                ref = sequence_logps(self.ref_model(**inputs, trace=ref_trace), ref_trace, k)
            with parallel.gradient_sync(self.model, j == len(micro) - 1):
                with self._autocast():
                    trace: dict = {}
                    logps = sequence_logps(self.model(**inputs, trace=trace), trace, k)
                    d = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta)
                (d.losses.sum() / n_pairs * world).backward()
            margins = (d.chosen_rewards - d.rejected_rewards).double().cpu()
            for i, task in enumerate(tasks):
                row = self.tasks.index(task)
                tally[row] += torch.stack([torch.ones((), dtype=torch.float64), margins[i], (margins[i] > 0).double()])
            tally[-1, 0] += float(d.losses.detach().sum())
            tokens += b.n_tokens
        tally = parallel.all_reduce_sum(tally, info)
        tokens = int(parallel.all_reduce_sum(torch.tensor([float(tokens)]), info).item())
        per_task = tally[:-1]
        stats = {"loss": float(tally[-1, 0]) / n_pairs, "reward_margin": float(per_task[:, 1].sum()) / n_pairs,
                 "reward_accuracy": float(per_task[:, 2].sum()) / n_pairs, "tokens": tokens}
        for task, (count, margin, correct) in zip(self.tasks, per_task.tolist()):
            if count:
                stats[f"margin/{task}"] = margin / count
                stats[f"accuracy/{task}"] = correct / count
        return stats

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, export: bool = False) -> None:
        """Collective: gathers the full model and optimizer state, then rank 0 writes (and exports)."""
        model_state, adapters = lora.split_state(parallel.full_model_state(self.model))
        optim_state = parallel.full_optimizer_state(self.model, self.optimizer)
        trainer_state = {"step": step, "epoch": step // self.plan.batches_per_epoch,
                         "batch_in_epoch": step % self.plan.batches_per_epoch,
                         "data_fingerprint": self.plan.fingerprint(), "world_size": self.info.world,
                         "stage": self.recipe.stage, "total_steps": self.total_steps}
        folder = ckpt.save_checkpoint(self.run_dir, step, self.cfg, model_state, optim_state, trainer_state,
                                      self.tokenizer_path, self.recipe.checkpoint.keep_last, self.info,
                                      extra={lora.ADAPTER_FILE: (adapters, {"scale": repr(self._lora_scale)})}
                                      if adapters else None)
        if self.info.main:
            log.info("saved %s", folder)
            if export:
                model_state, delta_file = self._with_lora_delta(model_state, adapters)
                log.info("exported %s", ckpt.export(self.run_dir, self.cfg, model_state, self.tokenizer_path,
                                                    extra=delta_file))

    def _with_lora_delta(self, dense: dict, adapters: dict) -> tuple[dict, dict | None]:
        """The export: adapters merged into the dense weights, and `lora.safetensors` = the LLM delta of the
        starting checkpoint (if still valid) followed by this stage's adapters, folded."""
        r = self.recipe
        prior = lora.load_delta(r.model.checkpoint) if r.model.checkpoint else {}
        if prior and self.llm_dense_trained:
            log.info("this stage trained the LLM's weights: %s/%s is not carried over", r.model.checkpoint,
                     lora.DELTA_FILE)
            prior = {}
        folded = lora.fold(adapters, self._lora_scale) if adapters else {}
        total = lora.concat(prior, folded)
        return lora.apply(dense, folded), ({lora.DELTA_FILE: (total, {})} if total else None)

    @property
    def _lora_scale(self) -> float:
        return self.recipe.lora.alpha / self.recipe.lora.rank

    def cleanup(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()


def run(recipe: Recipe, resume: bool = False) -> Trainer:
    recipe.validate()  # values were checked when parsed; a Recipe built or changed in code is checked here
    recipe.check_files()
    trainer = Trainer(recipe, resume)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


# ---------------------------------------------------------------------------------------------------- helpers

def _train_adapters_not_llm(model: torch.nn.Module) -> int:
    """With LoRA the LLM's own weights stay frozen and every adapter trains; returns the trained element count."""
    for name, p in model.named_parameters():
        if lora.is_adapter(name):
            p.requires_grad_(True)
        elif name.startswith(lora.LLM_PREFIX):
            p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _piper_factorized_speech_embeddings(model: FunAudioChatModel, seed: int) -> None:
    """The speech embedding rows of the Piper vocabulary <- unit + start/continue + gain vectors, at the rows' own
    scale (the specials above it are kept)."""
    from funaudiochat.speech.piper_tokens import VOCAB_SIZE, factorized_embeddings

    table = model.audio_tower.embed_tokens.weight
    if table.shape[0] < VOCAB_SIZE:
        raise ConfigError(f"model.speech_embeddings_at_start: the speech codebook ({table.shape[0]}) is smaller "
                          f"than the Piper vocabulary ({VOCAB_SIZE})")
    std = float(table.detach()[:VOCAB_SIZE].std()) / 3 ** 0.5  # three parts summed: the rows keep their scale
    with torch.no_grad():
        table[:VOCAB_SIZE] = factorized_embeddings(table.shape[1], std, seed).to(table.dtype)
    log.info("model.speech_embeddings_at_start: %d speech embeddings set to Piper unit + mark + gain vectors",
             VOCAB_SIZE)


def _regrouped_model(source: Path, cfg: FunAudioChatConfig, r: Recipe, fold_adapters: bool) -> FunAudioChatModel:
    """`source`'s weights in a model of another group size or continuous grouping (recipe model.group_size,
    model.continuous_grouping): the adapter's continuous matching weight is converted (model.adapter), and at a new
    group size the SRH's ungrouping layer (`pre_matching`: one LLM state -> k vectors) starts random. A new pending
    view starts random, a new speech opener as <|audio_bos|>'s embedding, a new answer style or cue at zero."""
    a, src = cfg.audio_config, FunAudioChatConfig.load(source).audio_config
    torch.manual_seed(r.train.seed)
    model = FunAudioChatModel(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(source).items()}  # ids stay ids
    if fold_adapters:
        state = lora.apply(state, lora.folded_adapters(source))
    if a.group_size != src.group_size:
        if model.audio_invert_tower is None:
            raise ConfigError(f"model.group_size: {source} has no Speech Refined Head to regroup")
        model.init_weights(r.model.init_std, modules=[model.audio_invert_tower.pre_matching])
        state = {k: v for k, v in state.items() if not k.startswith("audio_invert_tower.pre_matching.")}
    if a.srh_pending_units != src.srh_pending_units and a.srh_pending_units:
        if model.audio_invert_tower is None:
            raise ConfigError(f"model.srh_pending_units: {source} has no Speech Refined Head")
        with torch.no_grad():  # each slot's rows at unit scale: the sum of the slots comes to ~sqrt(D) per position
            model.audio_invert_tower.pending_embed.weight.normal_(0.0, a.srh_pending_units ** -0.5)
    state = {k: v for k, v in state.items()
             if a.srh_pending_units == src.srh_pending_units or not k.startswith("audio_invert_tower.pending_embed.")}
    if not a.speech_opener:
        state.pop("audio_tower.speech_opener", None)
    elif not src.speech_opener:  # it starts as <|audio_bos|>'s embedding: the model's function is unchanged
        state["audio_tower.speech_opener"] = state["language_model.model.embed_tokens.weight"][
            cfg.text_config.audio_bos_index].clone()
    if not a.srh_answer_style:
        state.pop("audio_invert_tower.answer_style.weight", None)
    if not a.srh_answer_cue:
        state.pop("audio_invert_tower.answer_cue.weight", None)
    if not a.srh_answer_prosody:
        state.pop("audio_invert_tower.answer_prosody.weight", None)
    key = "audio_tower.continual_output_matching.weight"
    state[key] = regroup_continuous_weight(state[key], src.group_size, src.continuous_grouping == "concat",
                                           a.group_size, a.continuous_grouping == "concat")
    load_state_dict_checked(model, {**model.state_dict(), **state}, str(source))
    log.info("group size %d, %s grouping (the starting model's: %d, %s): the adapter's continuous matching "
             "converted%s%s", a.group_size, a.continuous_grouping, src.group_size, src.continuous_grouping,
             ", the SRH's pre_matching starts random" if a.group_size != src.group_size else "",
             f", the SRH's view of {a.srh_pending_units} pending units starts random"
             if a.srh_pending_units != src.srh_pending_units else "")
    return model


def _target_owners(owners: torch.Tensor, labels: torch.Tensor, ignore: int) -> torch.Tensor:
    """The owner of each text target, in the order of the model's `text_logits="targets"` (position i predicts the
    rewritten label i + 1)."""
    return owners.to(labels.device)[:, :-1][labels[:, 1:] != ignore]


def _seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def _preset_config(r: Recipe) -> FunAudioChatConfig:
    make = getattr(presets, r.model.preset, None)
    if not callable(make):
        raise ConfigError(f"model.preset: unknown preset {r.model.preset!r} (see funaudiochat/model/presets.py)")
    try:
        return make(**r.model.preset_args)
    except TypeError as err:
        raise ConfigError(f"model.preset_args: {err}") from err


def _tokenizer_path(r: Recipe) -> Path:
    path = Path(r.model.tokenizer or r.model.checkpoint)
    return path / "tokenizer.json" if path.is_dir() else path


def _buffers_to(model: torch.nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf.device != device:
                setattr(module, name, buf.to(device))


def _progress(r: Recipe, info: parallel.DistInfo, start: int, total: int):
    if not (info.main and r.log.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=r.stage, dynamic_ncols=True)


def _log_report(report: DataReport, run_dir: Path) -> None:
    log.info("data: %s", report.summary())
    fileio.write_text(run_dir / "data_report.json", json.dumps(report.to_dict(), indent=2) + "\n")

"""The single-process training loop: plain PyTorch, one device, no Ray, no MLflow.

`Trainer` is the unit of work: `python -m trainers.train` runs it on a bare GPU box, and the
Ray Train wrapper (cluster) runs one per worker, passing `rank`/`world_size`, a `wrap_model`
hook (DDP), an `on_eval` hook (metrics + checkpoint reporting) and an `on_checkpoint` hook (a resume
checkpoint saved between evaluations, before `eval_from`). Its parts live beside it:
device policy (`device`), data as bucketed device tensors (`batching`), metrics and decoding
(`evaluation`), Adam with the Noam schedule (`optim`), the checkpoint format (`artifacts`); the RNG state a
checkpoint carries is saved and restored here, so that a resumed run reproduces the uninterrupted one.

Speed levers (the model is tiny, so a naive loop is host-bound): splits encoded and padded once
into length buckets on the device and an epoch plan built on the host (`batching`: no per-example
Python work and no host syncs in a step; the loss is read back only when logged); fused Adam (CUDA
and CPU kernels); bf16 autocast on CUDA and on CPUs with native bf16 dot products (AVX512-BF16 or
AMX: the output layer's matmuls run ~5x faster there); optional torch.compile on CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from trainers import artifacts
from trainers.batching import TensorSplit, tensor_split
from trainers.config import TrainConfig
from trainers.data.prepare import Prepared
from trainers.device import autocast, resolve_device
from trainers.evaluation import Evaluation, Evaluator
from trainers.metrics import DEFINITIONS, METRIC_MODES
from trainers.models import build_model
from trainers.models.batch import Batch
from trainers.models.interface import Output, Targets
from trainers.optim import build_optimizer
from trainers.tokens import PAD

OOV_EMBEDDING_STD = 0.01  # `embedding_init: vectors`: words without a vector ~ N(0, 0.01^2) (authors' code)


def model_overrides(cfg: TrainConfig, prepared: Prepared) -> dict:
    """The run's model overrides; IAMM without a knowledge backend is built without knowledge (no implicit
    association and no commonsense emotion head: not the paper's "w/o IA" row, which keeps the latter), never fed
    empty knowledge as if it were real."""
    overrides = dict(cfg.model_overrides)
    if cfg.model == "iamm" and prepared.manifest["substitutions"]["knowledge"].get("available") is False:
        overrides.setdefault("has_knowledge", False)
    return overrides


class Trainer:
    """Train one model on one device; evaluate, checkpoint, early-stop, resume."""

    def __init__(self, cfg: TrainConfig, prepared: Prepared, *, rank: int = 0, world_size: int = 1,
                 wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 on_eval: Callable[[dict, Path | None], None] | None = None,
                 on_checkpoint: Callable[[dict, Path | None], None] | None = None, log: Callable[[str], None] = print):
        self.cfg, self.prepared, self.rank, self.world_size = cfg, prepared, rank, world_size
        self.on_eval, self.on_checkpoint = on_eval, on_checkpoint
        self.log = log if rank == 0 else (lambda s: None)
        self.out = Path(cfg.out_dir)
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        vocab = prepared.vocab
        self.vocab = vocab
        self.model = build_model(cfg.model, len(vocab), vocab.emotion_ids(),
                                 **model_overrides(cfg, prepared)).to(self.device)
        cfg.vector_scale = init_word_embedding(self.model.embedding.weight, prepared if cfg.use_vectors else None,
                                               cfg.embedding_init)  # recorded for `unseen_vectors`
        if cfg.unseen_vectors and cfg.vector_scale is None:
            self.log("unseen_vectors: off, the word embedding was not built from word vectors")
            cfg.unseen_vectors = False
        self.raw_model = self.model
        if wrap_model is not None:
            self.model = wrap_model(self.model)
        if cfg.compile and self.device.type == "cuda":
            self.model = torch.compile(self.model, dynamic=False)
        self.optimizer, self.scheduler = build_optimizer(
            self.raw_model, self.device, betas=cfg.adam_betas, eps=cfg.adam_eps,
            d_model=getattr(self.raw_model.cfg, "d_model", 300), warmup=cfg.warmup, factor=cfg.lr_factor)
        t0 = time.perf_counter()
        self.train_data = tensor_split(cfg, prepared.split("train"), len(vocab), self.device)
        self.valid_data = tensor_split(cfg, prepared.split("valid"), len(vocab), self.device)
        self.evaluator = Evaluator(self.raw_model, vocab, self.device, batch_size=cfg.eval_batch_size,
                                   decode=cfg.decode_config(), bf16=cfg.bf16)
        self.final_evaluation: Evaluation | None = None  # set by finish(); the run's plots read it
        self.log(f"encoded {len(self.train_data)} train / {len(self.valid_data)} valid examples into "
                 f"{len(self.train_data.buckets)} buckets in {time.perf_counter() - t0:.1f} s")
        self.step, self.epoch, self.position = 0, 0, 0
        self.best: float | None = None
        self.bad_evals = 0
        self.history: list[dict] = []

    # ---- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "format": artifacts.CHECKPOINT_FORMAT, "config": self.cfg.model_dump(), "model_name": self.cfg.model,
            "model_config": vars(self.raw_model.cfg), "vocab": self.vocab.itos,
            "data_key": self.prepared.manifest["key"], "code_version": artifacts.trainers_source_hash(),
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step": self.step, "epoch": self.epoch, "position": self.position, "best": self.best,
            "bad_evals": self.bad_evals, "history": self.history, "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != artifacts.CHECKPOINT_FORMAT:
            raise ValueError(f"not an edp checkpoint (format {state.get('format')!r})")
        if state["vocab"] != self.vocab.itos:
            raise ValueError("checkpoint vocabulary differs from the prepared data's; same data settings needed")
        changed = model_config_changes(state.get("model_config", {}), self.raw_model.cfg)
        if changed:
            raise ValueError(f"checkpoint's model differs from this run's ({'; '.join(changed)}): resume with the "
                             "run's own settings (e.g. --set model_overrides.<field>=<checkpoint's value>) or start "
                             "afresh (--no-resume)")
        saved = state["config"].get("batching", "bucketed")  # older checkpoints: the bucketed plan
        if saved != self.cfg.batching:
            raise ValueError(f"checkpoint was trained with batching={saved!r}, this run has {self.cfg.batching!r}: "
                             f"its epoch position indexes the other plan; resume with --set batching={saved} "
                             "or start afresh (--no-resume)")
        if state["config"].get("vector_scale") is not None:  # the factor the run's first start applied
            self.cfg.vector_scale = state["config"]["vector_scale"]
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best, self.bad_evals, self.history = state["best"], state["bad_evals"], state["history"]
        set_rng_state(state["rng"])

    def save_checkpoint(self, tag: str | None = None) -> Path:
        """Atomically write `checkpoints/step_N.pt` (and `best.pt` when tagged); prune old ones."""
        ckpt_dir = self.out / "checkpoints"
        path = artifacts.save_checkpoint(self.state_dict(),
                                         ckpt_dir / f"{tag}.pt" if tag else artifacts.step_path(ckpt_dir, self.step))
        if tag is None:
            artifacts.prune(ckpt_dir, self.cfg.keep_checkpoints)
        return path

    def resume(self, path: Path | None = None) -> bool:
        """Load `path` or the newest `checkpoints/step_*.pt`; False when there is none."""
        if path is None:
            found = artifacts.step_checkpoints(self.out / "checkpoints")
            if not found:
                return False
            path = found[-1]
        self.load_state_dict(artifacts.read_checkpoint(path, self.device))
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.position})")
        return True

    # ---- training --------------------------------------------------------------------------------

    def train_step(self, batch: Batch) -> Output:
        self.model.train()
        with autocast(self.cfg.bf16, self.device):
            out = self.model(batch, Targets.of(batch))
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.grad_clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return out

    def _my_batches(self, epoch: int) -> list:
        """This rank's share of the epoch's plan (`batching`); a function of (seed, epoch), so (epoch, position)
        is all the resume state it needs."""
        make_plan = self.train_data.random_plan if self.cfg.batching == "random" else self.train_data.plan
        plan = make_plan(self.cfg.batch_size, self.cfg.seed, epoch)
        usable = len(plan) - len(plan) % self.world_size  # every rank gets the same number of steps
        return plan[self.rank:usable:self.world_size]

    def train(self) -> dict:
        """Run to `max_steps` or early stop; returns the final metrics (also written to metrics.json)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        stop = False
        t_last, steps_last, running = time.perf_counter(), self.step, []
        while self.step < cfg.max_steps and not stop:
            batches = self._my_batches(self.epoch)
            while self.position < len(batches) and self.step < cfg.max_steps:
                k, rows = batches[self.position]
                out = self.train_step(self.train_data.rows_batch(k, rows))
                self.position += 1
                running.append(out.loss.detach())
                if self.step % cfg.log_every == 0:
                    dt = time.perf_counter() - t_last
                    loss = torch.stack(running).mean().item()
                    rate = (self.step - steps_last) * cfg.batch_size * self.world_size / max(dt, 1e-9)
                    self.log(f"step {self.step} epoch {self.epoch} loss {loss:.4f} "
                             f"lr {self.scheduler.get_last_lr()[0]:.2e} {rate:.0f} ex/s")
                    self.history.append({"step": self.step, "train_loss": loss})
                    t_last, steps_last, running = time.perf_counter(), self.step, []
                if self.step >= cfg.eval_from and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    stop = self._evaluate_and_checkpoint()
                    if stop:
                        break
                elif self.step % cfg.eval_every == 0:
                    self._resume_checkpoint()
            if self.position >= len(batches):
                self.epoch, self.position = self.epoch + 1, 0
        return self.finish()

    def _resume_checkpoint(self) -> None:
        """Before `eval_from`: a checkpoint every `eval_every` steps without evaluating, so that a long run
        (the paper recipe evaluates from step 10,400/11,200 on) killed early loses at most `eval_every` steps."""
        path = self.save_checkpoint() if self.rank == 0 else None
        if self.on_checkpoint is not None:  # every rank: Ray Train's report is collective
            last = self.history[-1] if self.history else {}
            self.on_checkpoint({"step": self.step, "epoch": self.epoch,
                                **({"train_loss": last["train_loss"]} if "train_loss" in last else {})}, path)

    def _evaluate_and_checkpoint(self) -> bool:
        metrics = {"step": self.step, "epoch": self.epoch,
                   **{f"valid_{k}": v for k, v in self.evaluate(self.cfg.eval_generate).items()}}
        self.history.append(metrics)
        better = self._selects(metrics)
        if better:
            self.best, self.bad_evals = metrics[self._selection_metric()], 0
        else:
            self.bad_evals += 1
        path = None
        if self.rank == 0:
            path = self.save_checkpoint()
            if better:
                self.save_checkpoint("best")
        self.log("eval " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in metrics.items()))
        if self.on_eval is not None:
            self.on_eval(metrics, path)
        return self.cfg.selection == "early_stop" and self.bad_evals >= self.cfg.patience

    def _selection_metric(self) -> str:
        return "valid_ppl" if self.cfg.selection == "reference" else self.cfg.early_stop_metric

    def _selects(self, metrics: dict) -> bool:
        """Whether this evaluation's weights become `best.pt`. "early_stop": `early_stop_metric` improved.
        "reference" (the authors' main.py, valid split only): PPL <= the best kept PPL (100 before any), or
        PPL < select_ppl with emotion accuracy > select_acc (a model without an emotion head has accuracy 0)."""
        cfg = self.cfg
        if cfg.selection == "reference":
            ppl, acc = metrics["valid_ppl"], metrics.get("valid_acc", 0.0)
            return ppl <= (100.0 if self.best is None else self.best) or (ppl < cfg.select_ppl and acc > cfg.select_acc)
        value = metrics[cfg.early_stop_metric]
        return self.best is None or (value < self.best if METRIC_MODES[cfg.early_stop_metric] == "min"
                                     else value > self.best)

    def evaluate(self, generate: int = 0, data: TensorSplit | None = None) -> dict:
        return self.evaluator.evaluate(data or self.valid_data, generate)

    def finish(self) -> dict:
        """Final evaluation with the best weights on the whole valid split, metrics.json and samples.jsonl (rank 0)."""
        best = self.out / "checkpoints" / "best.pt"
        if best.exists():
            self.raw_model.load_state_dict(artifacts.read_checkpoint(best, self.device)["model"])
        else:  # the reference rule keeps nothing above PPL 100 (the authors' code would fall back to the init)
            self.log(f"no evaluation was selected ({self.cfg.selection}): the final weights are reported")
        evaluation = self.final_evaluation = self.evaluator.run(self.valid_data, generate=0)
        final = {f"valid_{k}": v for k, v in evaluation.metrics.items()}
        result = {"model": self.cfg.model, "step": self.step, "best": {self._selection_metric(): self.best},
                  "final": final, "definitions": DEFINITIONS, "history": self.history}
        if self.rank == 0:
            (self.out / "metrics.json").write_text(json.dumps(result, indent=1))
            with (self.out / "samples.jsonl").open("w") as f:
                for s in evaluation.generated[:self.cfg.num_samples]:
                    f.write(json.dumps({k: v for k, v in s.items() if not k.endswith("_tokens")}) + "\n")
        self.log("final " + " ".join(f"{k}={v:.4g}" for k, v in final.items()))
        return result


def model_config_changes(saved: dict, cfg) -> list[str]:
    """"field: checkpoint's value -> this model's" for each model config field that differs from a checkpoint's
    `model_config`; a field the checkpoint predates counts at its default (older runs keep their computation)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    return [f"{k}: {saved.get(k, defaults[k])!r} -> {v!r}" for k, v in vars(cfg).items()
            if saved.get(k, defaults[k]) != v]


def init_word_embedding(weight: torch.Tensor, prepared: Prepared | None, how: str) -> float | None:
    """Set the word embedding (V, emb) from the prepared word vectors (`prepared` None: no vectors); returns the
    factor the pretrained vectors were multiplied by (None: no vectors used), which evaluation and serving apply to
    the vectors of unseen words (`vector_scale`, trainers/data/unseen.py).

    "rescaled": the vectors scaled so that their mean row norm is the model's init's (unit scale after the
    embedding's x sqrt(emb_dim)); without vectors the model's init stays. "vectors" (the authors'): the vectors
    as they are (factor 1), words without one (and every word without vectors) ~ N(0, 0.01^2); the PAD row stays
    zero."""
    vectors = None if prepared is None else prepared.vectors()
    if vectors is not None and tuple(weight.shape) != vectors.shape:
        vectors = None  # a model with its own embedding size: keep its init
    with torch.no_grad():
        if how == "rescaled":
            if vectors is None:
                return None
            w = torch.from_numpy(vectors).to(weight.device)
            norm, init_norm = w[1:].norm(dim=1).mean().clamp_min(1e-6), weight[1:].norm(dim=1).mean()
            weight.copy_(w / norm * init_norm)
            return float(init_norm / norm)
        fresh = torch.randn_like(weight) * OOV_EMBEDDING_STD
        if vectors is not None:
            rows = prepared.vector_rows()
            if rows is None:
                raise ValueError(f"prepared data {prepared.path} has vectors but no vector_rows.npy: prepare it again")
            has = torch.from_numpy(rows).to(weight.device)
            fresh = torch.where(has[:, None], torch.from_numpy(vectors).to(weight.device, weight.dtype), fresh)
        fresh[PAD] = 0.0
        weight.copy_(fresh)
    return None if vectors is None else 1.0


# ------------------------------------------------------------------------------------------------
# RNG state (resume reproduces the uninterrupted run)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

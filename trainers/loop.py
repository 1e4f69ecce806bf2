"""The single-process training loop: plain PyTorch, one device, no Ray, no MLflow.

`Trainer` is the unit of work: `python -m trainers.train` runs it on a bare GPU box, and the
Ray Train wrapper (cluster) runs one per worker, passing `rank`/`world_size`, a `wrap_model`
hook (DDP) and an `on_eval` hook (metrics + checkpoint reporting).

Speed levers (the model is tiny, so a naive loop is host-bound):
- every split is encoded and padded ONCE into per-length-bucket tensors on the device
  (`TensorSplit`); a step only gathers rows, so there is no per-example Python work in the step;
- buckets give few, static shapes (bucket width `bucket_width`), good for torch.compile;
- the epoch plan (which rows form each batch, their extended-vocabulary size) is built on the
  host at epoch start, so the step does no host syncs; the loss is read back only when logged;
- fused Adam (CUDA and CPU kernels); bf16 autocast on CUDA and on CPUs with native bf16 dot products
  (AVX512-BF16 or AMX: the output layer's matmuls run ~5x faster there); optional torch.compile on CUDA.
"""

from __future__ import annotations

import functools
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from trainers.config import StrictModel
from trainers.data.collate import EncodedExample, encode_escm, pad_escm, pad_iamm
from trainers.data.emotions import EMOTIONS
from trainers.data.prepare import DataConfig, Prepared, PreparedSplit
from trainers.decoding import DecodeConfig, decode, ids_to_tokens
from trainers.metrics import MetricAccumulator
from trainers.models import build_model
from trainers.models.common import Output, Targets, noam_lambda

CHECKPOINT_FORMAT = "edp-checkpoint/1"
METRIC_MODES = {"valid_ppl": "min", "valid_loss": "min", "valid_acc": "max", "valid_dist1": "max",
                "valid_dist2": "max", "valid_bleu4": "max"}


class TrainConfig(StrictModel):
    """Everything one training run needs; defaults are the papers' settings."""

    model: Literal["transformer", "escm", "iamm"] = "escm"
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="model config fields, e.g. no_vr")
    data: DataConfig = Field(default_factory=DataConfig)
    out_dir: str = "runs/train"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    max_steps: int = Field(13500, ge=1, description="ESCM converged after 13,500 steps (paper 4.2)")
    warmup: int = Field(8000, ge=1, description="Noam warm-up steps")
    lr_factor: float = Field(1.0, gt=0, description="Noam schedule factor")
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = Field(1e-9, gt=0)
    grad_clip: float = Field(2.0, ge=0, description="max global grad norm; 0 disables")
    eval_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)
    eval_generate: int = Field(256, ge=0, description="valid examples decoded per evaluation (0 = all)")
    early_stop_metric: str = "valid_ppl"
    patience: int = Field(10, ge=1, description="evaluations without improvement before stopping")
    keep_checkpoints: int = Field(2, ge=1)
    max_context: int = Field(400, ge=8)
    max_target: int = Field(60, ge=4)
    bucket_width: int = Field(32, ge=8)
    bf16: bool = Field(True, description="bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX)")
    compile: bool = Field(False, description="torch.compile the model (CUDA)")
    use_vectors: bool = Field(True, description="initialise word embeddings from the prepared vectors")
    num_samples: int = Field(100, ge=0, description="sample generations written at the end")
    decode: dict[str, Any] = Field(default_factory=dict, description="DecodeConfig fields")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.early_stop_metric not in METRIC_MODES:
            raise ValueError(f"early_stop_metric must be one of {sorted(METRIC_MODES)}")
        DecodeConfig(**self.decode)  # fail early on bad decoding settings
        return self

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(**self.decode)


def model_overrides(cfg: TrainConfig, prepared: Prepared) -> dict:
    """The run's model overrides; IAMM without a knowledge backend is built as the paper's "w/o IA" model
    (no commonsense encoders: nothing to associate), never fed empty knowledge as if it were real."""
    overrides = dict(cfg.model_overrides)
    if cfg.model == "iamm" and prepared.manifest["substitutions"]["knowledge"].get("available") is False:
        overrides.setdefault("has_knowledge", False)
    return overrides


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls are native (not emulated) on this device type: CUDA with bf16 support, or a CPU
    advertising AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo; False where it cannot be read)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(cfg: TrainConfig, device: torch.device, min_cpu_batch: int = 0, batch: int = 0):
    """bf16 autocast when enabled and native on the device (`native_bf16`), on a CPU only for batches of at
    least `min_cpu_batch` rows (inference: small CPU batches run faster in fp32); a no-op context elsewhere."""
    on = cfg.bf16 and native_bf16(device.type) and (device.type != "cpu" or batch >= min_cpu_batch)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------------
# Data: a split as device tensors grouped by length bucket


@dataclass
class Bucket:
    rows: np.ndarray                       # example indices in this bucket
    tensors: dict[str, torch.Tensor]       # padded to the bucket's lengths, on device
    n_oov: np.ndarray                      # OOV-list length per row (host), for max_oov
    tgt_len: np.ndarray                    # target length (EOS included) per row (host)
    turns: np.ndarray                      # IAMM: (rows, 3) turns, longest turn, situation length (host)


class TensorSplit:
    """A prepared split encoded once and padded per length bucket (static shapes, no per-step collation)."""

    def __init__(self, split: PreparedSplit, vocab_size: int, cfg: TrainConfig, device: torch.device,
                 iamm: bool = False):
        self.split = split
        self.encoded: list[EncodedExample] = [
            encode_escm(split, i, vocab_size, cfg.max_context, cfg.max_target) for i in range(len(split.examples))
        ]
        lengths = np.array([len(e.context_ids) for e in self.encoded])
        key = np.ceil(lengths / cfg.bucket_width).astype(int)
        self.buckets: list[Bucket] = []
        self.where = np.zeros((len(self.encoded), 2), dtype=np.int64)  # example -> (bucket, row in bucket)
        pad = pad_iamm if iamm else pad_escm
        for k in np.unique(key):
            rows = np.flatnonzero(key == k)
            members = [self.encoded[i] for i in rows]
            batch = pad(members) if iamm else pad(members, context_len=int(k) * cfg.bucket_width)
            tensors = {n: v.to(device) for n, v in batch.items() if isinstance(v, torch.Tensor)}
            tensors["context_dep"] = tensors["context_dep"].to(torch.uint8)  # labels < 256: 8x less memory
            self.where[rows] = np.stack([np.full(len(rows), len(self.buckets)), np.arange(len(rows))], 1)
            self.buckets.append(Bucket(
                rows, tensors, np.array([len(e.oov) for e in members]), np.array([len(e.target_ids) for e in members]),
                np.array([(len(e.turns), max(len(t) for t in e.turns), len(e.situation_ids)) for e in members])))

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, bucket: int, rows: torch.Tensor | np.ndarray, max_oov: int, target_len: int | None = None) -> dict:
        """Gather `rows` of one bucket: a batch following the collate contract, targets cut to `target_len`."""
        b = self.buckets[bucket]
        idx = torch.as_tensor(rows, device=next(iter(b.tensors.values())).device)
        out: dict[str, Any] = {n: t.index_select(0, idx) for n, t in b.tensors.items()}
        out["context_dep"] = out["context_dep"].long()
        if target_len is not None:
            for name in ("target_ids", "target_ext_ids"):
                out[name] = out[name][:, :target_len]
        out["max_oov"] = max_oov
        return out

    def rows_batch(self, bucket: int, rows: np.ndarray) -> dict:
        """`batch` with max_oov and the target length (rounded up to 8: few shapes) read from host arrays."""
        b = self.buckets[bucket]
        t_len = int(-(-b.tgt_len[rows].max() // 8) * 8)
        out = self.batch(bucket, rows, int(b.n_oov[rows].max()), t_len)
        if "utt_ids" in out:  # IAMM: cut turns, turn length and situation to this batch's longest
            M, Lu, Ls = (int(v) for v in b.turns[rows].max(0))
            for name in ("utt_ids", "utt_mask"):
                out[name] = out[name][:, :M, :Lu]
            for name in ("utt_state", "turn_mask"):
                out[name] = out[name][:, :M]
            for name in ("situation_ids", "situation_mask"):
                out[name] = out[name][:, :Ls]
            for name in ("knowledge_ids", "knowledge_mask"):  # the situation's knowledge stays in the last slot
                out[name] = torch.cat([out[name][:, :M], out[name][:, -1:]], dim=1)
        return out

    def plan(self, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[tuple[int, np.ndarray]]:
        """The epoch's batches as (bucket, rows); deterministic in (seed, epoch)."""
        rng = np.random.default_rng([seed, epoch])
        batches = []
        for k, b in enumerate(self.buckets):
            order = rng.permutation(len(b.rows)) if shuffle else np.arange(len(b.rows))
            for s in range(0, len(order), batch_size):
                batches.append((k, order[s:s + batch_size]))
        if shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches


# ------------------------------------------------------------------------------------------------
# Trainer


class Evaluator:
    """Teacher-forced metrics and decoding over a `TensorSplit` (used by the trainer and `edp evaluate`)."""

    def __init__(self, model: torch.nn.Module, vocab, cfg: TrainConfig, device: torch.device):
        self.model, self.vocab, self.cfg, self.device = model, vocab, cfg, device

    def _autocast(self):
        return autocast(self.cfg, self.device)

    @torch.inference_mode()
    def evaluate(self, data: TensorSplit, generate: int = 0) -> dict:
        """Teacher-forced loss/PPL and emotion accuracy on all of `data`, plus
        Dist-1/2 and BLEU over the greedy/beam/sampled responses of its first `generate` examples (0 = all)."""
        model = self.model
        model.eval()
        acc = MetricAccumulator()
        for k, rows in data.plan(self.cfg.eval_batch_size, 0, 0, shuffle=False):
            batch = data.rows_batch(k, rows)
            with self._autocast():
                out = model(batch, Targets.of(batch))
            logits = out.emotion_logits
            acc.add(nll_sum=out.nll_sum.float(), num_tokens=out.num_tokens,
                    emotion_pred=None if logits is None else logits.argmax(-1),
                    emotion_gold=None if logits is None else batch["emotion"])
        metrics = acc.compute()
        n = len(data) if generate == 0 else min(generate, len(data))
        if n:
            generated = self.generate(range(n), data)
            gen_acc = MetricAccumulator()
            gen_acc.add(hypotheses=[g["generated_tokens"] for g in generated],
                        references=[g["reference_tokens"] for g in generated])
            metrics.update({k: v for k, v in gen_acc.compute().items() if k.startswith(("dist", "bleu"))})
        return metrics

    @torch.inference_mode()
    def emotion_predictions(self, data: TensorSplit) -> tuple[list[int], list[int]]:
        """(predicted, gold) emotion ids over `data`; empty lists for a model without an emotion head."""
        pred, gold = [], []
        for k, rows in data.plan(self.cfg.eval_batch_size, 0, 0, shuffle=False):
            batch = data.rows_batch(k, rows)
            with self._autocast():
                logits = self.model.eval().encode(batch).emotion_logits
            if logits is None:
                return [], []
            pred += logits.argmax(-1).tolist()
            gold += batch["emotion"].tolist()
        return pred, gold

    @torch.inference_mode()
    def generate(self, indices, data: TensorSplit) -> list[dict]:
        """Decode examples `indices`; returns per example the text fields and predicted emotion."""
        model, dcfg = self.model, self.cfg.decode_config()
        model.eval()
        indices = np.asarray(list(indices), dtype=np.int64)
        results: dict[int, dict] = {}
        for k in np.unique(data.where[indices, 0]):
            members = indices[data.where[indices, 0] == k]
            for s in range(0, len(members), self.cfg.eval_batch_size):
                chunk = members[s:s + self.cfg.eval_batch_size]
                rows = data.where[chunk, 1]
                batch = data.rows_batch(int(k), rows)
                with self._autocast():
                    state = model.encode(batch)
                    ids = decode(model, batch, dcfg, state=state)
                    logits = state.emotion_logits
                oovs = [data.encoded[i].oov for i in chunk]
                tokens = ids_to_tokens(ids.tolist(), self.vocab.itos, oovs)
                probs = None if logits is None else torch.softmax(logits.float(), -1)
                for j, i in enumerate(chunk):
                    results[int(i)] = self._record(data, int(i), tokens[j], probs[j] if probs is not None else None)
        return [results[int(i)] for i in indices]

    def _record(self, data: TensorSplit, i: int, tokens: list[str], probs: torch.Tensor | None) -> dict:
        ex, split = data.split.examples[i], data.split
        pred = None if probs is None else int(probs.argmax())
        return {
            "conv_id": ex.conv_id, "turn": ex.turn, "context": list(ex.context), "situation": ex.situation,
            "reference": ex.target, "generated": " ".join(tokens), "generated_tokens": tokens,
            "reference_tokens": list(split.tokens[split.target[i]]), "gold_emotion": ex.emotion,
            "predicted_emotion": None if pred is None else EMOTIONS[pred],
            "predicted_prob": None if probs is None else float(probs[pred]),
        }


class Trainer:
    """Train one model on one device; evaluate, checkpoint, early-stop, resume."""

    def __init__(self, cfg: TrainConfig, prepared: Prepared, *, rank: int = 0, world_size: int = 1,
                 wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 on_eval: Callable[[dict, Path | None], None] | None = None, log: Callable[[str], None] = print):
        self.cfg, self.prepared, self.rank, self.world_size = cfg, prepared, rank, world_size
        self.on_eval, self.log = on_eval, (log if rank == 0 else (lambda s: None))
        self.out = Path(cfg.out_dir)
        self.device = resolve_device(cfg.device)
        _seed_everything(cfg.seed)
        vocab = prepared.vocab
        self.vocab = vocab
        self.model = build_model(cfg.model, len(vocab), vocab.emotion_ids(),
                                 **model_overrides(cfg, prepared)).to(self.device)
        vectors = prepared.vectors() if cfg.use_vectors else None
        if vectors is not None and self.model.embedding.weight.shape == vectors.shape:
            with torch.no_grad():  # spaCy/GloVe init, rescaled to the embedding's x sqrt(d) convention
                w = torch.from_numpy(vectors).to(self.device)
                self.model.embedding.weight.copy_(w / w[1:].norm(dim=1).mean().clamp_min(1e-6)
                                                  * self.model.embedding.weight[1:].norm(dim=1).mean())
        self.raw_model = self.model
        if wrap_model is not None:
            self.model = wrap_model(self.model)
        if cfg.compile and self.device.type == "cuda":
            self.model = torch.compile(self.model, dynamic=False)
        self.optimizer = torch.optim.Adam(self.raw_model.parameters(), lr=1.0, betas=cfg.adam_betas,
                                          eps=cfg.adam_eps, fused=self.device.type in ("cuda", "cpu"))
        d_model = getattr(self.raw_model.cfg, "d_model", 300)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(noam_lambda, d_model=d_model, warmup=cfg.warmup, factor=cfg.lr_factor))
        iamm = cfg.model == "iamm"
        t0 = time.perf_counter()
        self.train_data = TensorSplit(prepared.split("train"), len(vocab), cfg, self.device, iamm)
        self.valid_data = TensorSplit(prepared.split("valid"), len(vocab), cfg, self.device, iamm)
        self.evaluator = Evaluator(self.raw_model, vocab, cfg, self.device)
        self.log(f"encoded {len(self.train_data)} train / {len(self.valid_data)} valid examples into "
                 f"{len(self.train_data.buckets)} buckets in {time.perf_counter() - t0:.1f} s")
        self.step, self.epoch, self.position = 0, 0, 0
        self.best: float | None = None
        self.bad_evals = 0
        self.history: list[dict] = []

    # ---- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "config": self.cfg.model_dump(), "model_name": self.cfg.model,
            "model_config": vars(self.raw_model.cfg), "vocab": self.vocab.itos,
            "data_key": self.prepared.manifest["key"], "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "step": self.step, "epoch": self.epoch, "position": self.position, "best": self.best,
            "bad_evals": self.bad_evals, "history": self.history, "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not an edp checkpoint (format {state.get('format')!r})")
        if state["vocab"] != self.vocab.itos:
            raise ValueError("checkpoint vocabulary differs from the prepared data's; same data settings needed")
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best, self.bad_evals, self.history = state["best"], state["bad_evals"], state["history"]
        _set_rng_state(state["rng"])

    def save_checkpoint(self, tag: str | None = None) -> Path:
        """Atomically write `checkpoints/step_N.pt` (and `best.pt` when tagged); prune old ones."""
        ckpt_dir = self.out / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt_dir / (f"{tag}.pt" if tag else f"step_{self.step:08d}.pt")
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        if tag is None:
            for old in sorted(ckpt_dir.glob("step_*.pt"))[:-self.cfg.keep_checkpoints]:
                old.unlink()
        return path

    def resume(self, path: Path | None = None) -> bool:
        """Load `path` or the newest `checkpoints/step_*.pt`; False when there is none."""
        if path is None:
            found = sorted((self.out / "checkpoints").glob("step_*.pt"))
            if not found:
                return False
            path = found[-1]
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.position})")
        return True

    # ---- training --------------------------------------------------------------------------------

    def train_step(self, batch: dict) -> Output:
        self.model.train()
        with autocast(self.cfg, self.device):
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
        plan = self.train_data.plan(self.cfg.batch_size, self.cfg.seed, epoch)
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
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    stop = self._evaluate_and_checkpoint()
                    if stop:
                        break
            if self.position >= len(batches):
                self.epoch, self.position = self.epoch + 1, 0
        return self.finish()

    def _evaluate_and_checkpoint(self) -> bool:
        metrics = {"step": self.step, "epoch": self.epoch,
                   **{f"valid_{k}": v for k, v in self.evaluate(self.cfg.eval_generate).items()}}
        self.history.append(metrics)
        value = metrics[self.cfg.early_stop_metric]
        better = self.best is None or (value < self.best if METRIC_MODES[self.cfg.early_stop_metric] == "min"
                                       else value > self.best)
        if better:
            self.best, self.bad_evals = value, 0
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
        return self.bad_evals >= self.cfg.patience

    def evaluate(self, generate: int = 0, data: TensorSplit | None = None) -> dict:
        return self.evaluator.evaluate(data or self.valid_data, generate)

    def generate(self, indices, data: TensorSplit | None = None) -> list[dict]:
        return self.evaluator.generate(indices, data or self.valid_data)

    def finish(self) -> dict:
        """Final evaluation with the best weights, metrics.json and samples.jsonl (rank 0)."""
        best = self.out / "checkpoints" / "best.pt"
        if best.exists():
            self.raw_model.load_state_dict(torch.load(best, map_location=self.device, weights_only=False)["model"])
        final = {f"valid_{k}": v for k, v in self.evaluate(self.cfg.eval_generate).items()}
        result = {"model": self.cfg.model, "step": self.step, "best": {self.cfg.early_stop_metric: self.best},
                  "final": final, "history": self.history}
        if self.rank == 0:
            (self.out / "metrics.json").write_text(json.dumps(result, indent=1))
            samples = self.generate(range(min(self.cfg.num_samples, len(self.valid_data))))
            with (self.out / "samples.jsonl").open("w") as f:
                for s in samples:
                    f.write(json.dumps({k: v for k, v in s.items() if not k.endswith("_tokens")}) + "\n")
        self.log("final " + " ".join(f"{k}={v:.4g}" for k, v in final.items()))
        return result


# ------------------------------------------------------------------------------------------------
# RNG state (resume reproduces the uninterrupted run)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


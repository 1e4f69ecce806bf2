"""Evaluate a trained checkpoint or serving bundle on any ED-format source (jsonl dir/file, official CSV dir or
tar.gz, s3://).

Writes `metrics.json` (Acc / PPL / PPL_token / Dist-1 / Dist-2 / BLEU over the whole split, and the `definitions`
of each, trainers.metrics.DEFINITIONS) and `predictions.jsonl` (one line per example: conv_id, turn, gold and
predicted emotion with its probability, generated response, reference, and the reference's teacher-forced summed
NLL `nll_sum` over its `num_tokens` target tokens, EOS included: enough to recompute both PPLs). Decoding settings
are the run's (the paper's greedy decoding by default) unless overridden.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainers import artifacts
from trainers.data.prepare import split_with_vocab
from trainers.data.sources import load_splits
from trainers.device import resolve_device
from trainers.evaluator import Evaluator
from trainers.loop import tensor_split
from trainers.metrics import DEFINITIONS


def evaluate_checkpoint(checkpoint: str | Path, source: str, split: str, out_dir: str | Path, *,
                        device: str = "cpu", decode: dict | None = None, skip_invalid: bool = False,
                        label: str | None = None) -> dict:
    """Metrics and predictions of `checkpoint` (a file or bundle; `label` names it in metrics.json) on a split."""
    loaded = artifacts.load(checkpoint, device)
    cfg, model, vocab = loaded.train_config(), loaded.model, loaded.vocab
    cfg = cfg.model_copy(update={"device": device, "decode": {**cfg.decode, **(decode or {})}})
    report = load_splits(source, splits=[split], skip_invalid=skip_invalid)[split]
    prepared = split_with_vocab(split, report, vocab, cfg.data)
    dev = resolve_device(device)
    data = tensor_split(cfg, prepared, len(vocab), dev)
    evaluator = Evaluator(model, vocab, dev, batch_size=cfg.eval_batch_size, decode=cfg.decode_config(),
                          bf16=cfg.bf16)
    evaluation = evaluator.run(data, generate=0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": label or str(checkpoint), "source": source, "split": split, "examples": len(data),
              "skipped": len(report.invalid), "decode": cfg.decode_config().__dict__, "metrics": evaluation.metrics,
              "definitions": DEFINITIONS}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    with (out / "predictions.jsonl").open("w") as f:
        for p, nll, n in zip(evaluation.generated, evaluation.nll_sum, evaluation.num_tokens, strict=True):
            record = {k: p[k] for k in ("conv_id", "turn", "gold_emotion", "predicted_emotion", "predicted_prob",
                                        "generated", "reference")}
            f.write(json.dumps({**record, "nll_sum": float(nll), "num_tokens": int(n)}) + "\n")
    return result

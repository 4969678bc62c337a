"""Every loss term on the default pair, seed variant against kdlab's form, at initialisation and
after training; with each term's share of the student's gradient norm.

    python scripts/loss_report.py                  # 200 steps of configs/all-terms.yaml
    python scripts/loss_report.py --steps 20       # a quicker look

Values are means over the first `--batches` validation batches (the same ones both times).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

import kdlab
from kdlab.feature_losses import attention_kl, ln_mse
from kdlab.losses import IGNORE_INDEX, kd_loss, lm_loss, next_token_labels
from kdlab.precision import student_outputs, teacher_outputs
from kdlab.seed import (
    seed_attention_batchmean,
    seed_feature_mse,
    seed_feature_mse_per_dim,
    seed_kd_batchmean,
)


def measure(trainer: kdlab.Trainer, n_batches: int) -> dict[str, float]:
    cfg, heads = trainer.cfg, trainer.heads
    rows: dict[str, list[float]] = {}

    def add(key, value):
        rows.setdefault(key, []).append(float(value))

    for batch in trainer.data["validation"].eval_batches(cfg.batch_size, n_batches):
        batch = {k: v.to(trainer.precision.device) for k, v in batch.items()}
        tgt = next_token_labels(batch["labels"])
        mask = batch["attention_mask"].bool()
        s_out = student_outputs(trainer.student, batch, trainer.precision, True, True)
        t_out = teacher_outputs(trainer.teacher, batch, True, True)
        terms = {"kd": kd_loss(s_out.logits, t_out.logits, tgt != IGNORE_INDEX, temperature=cfg.temperature),
                 "lm": lm_loss(s_out.logits, tgt), **heads(s_out, t_out, mask)}
        for k, v in terms.items():
            add(f"kdlab/{k}", v.detach())
        weights = {"kd": cfg.alpha_kd, "lm": 1 - cfg.alpha_kd, **heads.weights}
        shares = trainer._grad_shares({k: weights[k] * v for k, v in terms.items() if weights[k] > 0})
        for k, v in shares.items():
            add(f"share/{k}", v)
        with torch.no_grad():
            add("seed/kd", seed_kd_batchmean(s_out.logits, t_out.logits, cfg.temperature))
            add("seed/lm", terms["lm"])
            # the seed's feature loss: raw MSE of the projected student state against the raw teacher state
            for name, fn in (("seed/feature", seed_feature_mse), ("seed/feature_per_dim", seed_feature_mse_per_dim)):
                add(name, torch.stack([fn(r.proj(s_out.hidden_states[i + 1]), t_out.hidden_states[heads.experts[-1] + 1])
                                       for i, r in enumerate(heads.routers)]).mean())
            add("seed/attention", torch.stack([seed_attention_batchmean(s_out.attentions[i], t_out.attentions[j])
                                               for i, j in enumerate(heads.layer_map)]).mean())
            add("seed/layerwise", torch.stack([seed_feature_mse(p(s_out.hidden_states[i + 1]),
                                                                t_out.hidden_states[j + 1])
                                               for i, (p, j) in enumerate(zip(heads.layer_proj, heads.layer_map))]).mean())
            add("check/attention_kl_layer0", attention_kl(s_out.attentions[0], t_out.attentions[heads.layer_map[0]], mask))
            add("check/ln_mse_embeddings", ln_mse(s_out.hidden_states[0], t_out.hidden_states[0], mask))
        trainer.student.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)
    return {k: sum(v) / len(v) for k, v in rows.items()}


def table(before: dict, after: dict, steps: int) -> str:
    lines = [f"{'term':12} {'seed form (init)':>18} {'kdlab (init)':>13} {'share (init)':>13} "
             f"{'seed form (' + str(steps) + ')':>18} {'kdlab (' + str(steps) + ')':>13} {'share (' + str(steps) + ')':>13}"]
    for term in ("kd", "lm", "feature", "attention", "layerwise", "contrastive"):
        def g(d, k):
            return f"{d[k]:.4g}" if k in d else "-"
        lines.append(f"{term:12} {g(before, 'seed/' + term):>18} {g(before, 'kdlab/' + term):>13} "
                     f"{g(before, 'share/' + term):>13} {g(after, 'seed/' + term):>18} {g(after, 'kdlab/' + term):>13} "
                     f"{g(after, 'share/' + term):>13}")
    lines.append(f"{'feature/D':12} {before['seed/feature_per_dim']:>18.4g} {'':>13} {'':>13} "
                 f"{after['seed/feature_per_dim']:>18.4g}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/all-terms.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--out", default="runs/loss-report.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = kdlab.load_config(args.config, {"max_steps": args.steps, "eval_every": 0, "save_every": 0,
                                          "out_dir": "runs/loss-report", "log_every": 10,
                                          "curriculum": "constant", "early_stopping": False})  # as measured
    trainer = kdlab.Trainer.from_config(cfg)
    before = measure(trainer, args.batches)
    t0 = time.perf_counter()
    state = trainer.fit()
    seconds = time.perf_counter() - t0
    after = measure(trainer, args.batches)
    print(table(before, after, state.step))
    routers = [r for r in state.history if r["kind"] == "train" and "router" in r]
    if routers:
        print("router utilisation at the last log line (per student layer, per expert):")
        for i, r in enumerate(routers[-1]["router"]):
            print(f"  layer {i}: " + " ".join(f"{u:.3f}" for u in r["utilisation"]) + f"  entropy {r['entropy']:.3f}")
    print(f"{state.step} steps in {seconds:.0f} s, skipped (non-finite) steps: {state.skipped_steps}")
    with open(args.out, "w") as f:
        json.dump({"before": before, "after": after, "steps": state.step, "skipped": state.skipped_steps,
                   "seconds": seconds, "history": state.history}, f)


if __name__ == "__main__":
    main()

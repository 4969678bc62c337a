"""Every loss term on the default pair, the original framework's form against kdlab's, at initialisation and
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
from kdlab.course.original import (
    original_attention_batchmean,
    original_feature_mse,
    original_feature_mse_per_dim,
    original_kd_batchmean,
)
from kdlab.loss.features import attention_kl, ln_mse, uniform_layer_map
from kdlab.precision import student_outputs, teacher_outputs


def measure(trainer: kdlab.Trainer, n_batches: int) -> dict[str, float]:
    cfg, obj = trainer.cfg, trainer.objective
    heads = obj.heads  # the terms' trainable modules: feature routers, layerwise projections, ...
    rows: dict[str, list[float]] = {}

    def add(key, value):
        rows.setdefault(key, []).append(float(value))

    for batch in trainer.data["validation"].eval_batches(cfg.batch_size, n_batches):
        batch = {k: v.to(trainer.precision.device) for k, v in batch.items()}
        mask = batch["attention_mask"].bool()
        s_out = student_outputs(trainer.student, batch, trainer.precision, True, True)
        t_out = teacher_outputs(trainer.teacher, batch, True, True)
        # kdlab's terms exactly as a training step computes them, at their configured (maximum) weights
        loss = obj.terms_of(s_out, t_out, batch, kdlab.StepCounts.of([batch]), weights=obj.max_weights)
        for k, v in loss.terms.items():
            add(f"kdlab/{k}", v.detach())
        student_params = [p for p in trainer.student.parameters() if p.requires_grad]
        for k, v in obj.grad_shares(loss.weighted, student_params).items():
            add(f"share/{k}", v)
        layer_map = uniform_layer_map(len(s_out.hidden_states) - 1, len(t_out.hidden_states) - 1)
        with torch.no_grad():
            add("original/kd", original_kd_batchmean(s_out.logits, t_out.logits, cfg.temperature))
            add("original/lm", loss.terms["lm"])
            # the original feature loss: raw MSE of the projected student state against the raw teacher state
            feature = heads["feature"]
            for name, fn in (
                ("original/feature", original_feature_mse),
                ("original/feature_per_dim", original_feature_mse_per_dim),
            ):
                add(
                    name,
                    torch.stack(
                        [
                            fn(r.proj(s_out.hidden_states[i + 1]), t_out.hidden_states[feature.experts[-1] + 1])
                            for i, r in enumerate(feature.routers)
                        ]
                    ).mean(),
                )
            add(
                "original/attention",
                torch.stack(
                    [
                        original_attention_batchmean(s_out.attentions[i], t_out.attentions[j])
                        for i, j in enumerate(layer_map)
                    ]
                ).mean(),
            )
            add(
                "original/layerwise",
                torch.stack(
                    [
                        original_feature_mse(p(s_out.hidden_states[i + 1]), t_out.hidden_states[j + 1])
                        for i, (p, j) in enumerate(zip(heads["layerwise"], layer_map))
                    ]
                ).mean(),
            )
            add("check/attention_kl_layer0", attention_kl(s_out.attentions[0], t_out.attentions[layer_map[0]], mask))
            add("check/ln_mse_embeddings", ln_mse(s_out.hidden_states[0], t_out.hidden_states[0], mask))
        trainer.student.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)
    return {k: sum(v) / len(v) for k, v in rows.items()}


def table(before: dict, after: dict, steps: int) -> str:
    lines = [
        f"{'term':12} {'original form (init)':>18} {'kdlab (init)':>13} {'share (init)':>13} "
        f"{'original form (' + str(steps) + ')':>18} {'kdlab (' + str(steps) + ')':>13} "
        f"{'share (' + str(steps) + ')':>13}"
    ]
    for term in ("kd", "lm", "feature", "attention", "layerwise", "contrastive"):

        def g(d, k):
            return f"{d[k]:.4g}" if k in d else "-"

        lines.append(
            f"{term:12} {g(before, 'original/' + term):>18} {g(before, 'kdlab/' + term):>13} "
            f"{g(before, 'share/' + term):>13} {g(after, 'original/' + term):>18} {g(after, 'kdlab/' + term):>13} "
            f"{g(after, 'share/' + term):>13}"
        )
    lines.append(
        f"{'feature/D':12} {before['original/feature_per_dim']:>18.4g} {'':>13} {'':>13} "
        f"{after['original/feature_per_dim']:>18.4g}"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/all-terms.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--out", default="runs/loss-report.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = kdlab.load_config(
        args.config,
        {
            "max_steps": args.steps,
            "eval_every": 0,
            "save_every": 0,
            "out_dir": "runs/loss-report",
            "log_every": 10,
            "curriculum": "constant",
            "early_stopping": False,
        },
    )  # as measured
    trainer = kdlab.build_trainer(cfg)
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
        json.dump(
            {
                "before": before,
                "after": after,
                "steps": state.step,
                "skipped": state.skipped_steps,
                "seconds": seconds,
                "history": state.history,
            },
            f,
        )


if __name__ == "__main__":
    main()

"""The objective: the whole loss of a step, from a batch to the weighted total.

    objective = Objective(cfg, student, teacher, total_steps)
    out = objective.loss(student, teacher, batch, precision)      # one batch, as the trainer does it
    out.terms["kd"], out.weighted, out.total.backward()
    objective.step()                                               # the curriculum moves on

It owns every decision between the models and the backward pass:
    which outputs the forwards must return   `needs` (hidden states, attention maps, the teacher at all)
    the logit alignment                      `match_logits` (padded vocabularies by id, or learned)
    every term                               the registry of kdlab.loss.terms, the active ones only
    the weights                              the curriculum (kdlab.loss.curriculum) over the terms' maxima
    balancing                                AdaptiveBalancer (opt-in)
    the total                                sum_k w_k(step) * term_k, in registry order
    gradient shares                          `grad_shares` (each weighted term's share of the grad norm)

Reductions make accumulation exact: with `counts` of the whole step (all micro-batches, all
processes), each micro-batch's terms are its part of the step's mean, so their sum over the
micro-batches equals the terms of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdlab.errors import KDLabError
from kdlab.loss.balance import AdaptiveBalancer
from kdlab.loss.curriculum import CurriculumScheduler, parse_ramps
from kdlab.loss.divergences import IGNORE_INDEX, next_token_labels
from kdlab.loss.fused import FusedLoss, final_hidden_states, fused_linear_kd_lm, fused_unavailable, output_weight
from kdlab.loss.terms import CACHED_TEACHER_KEYS, TERMS, Needs, Term, TermContext, match_logits
from kdlab.precision import Precision, student_outputs, teacher_outputs


def phase(name: str):
    """A named range of the step for torch.profiler ("kdlab: backward", ...); next to free without one."""
    return torch.profiler.record_function(f"kdlab: {name}")


@dataclass
class StepCounts:
    """The denominators of a step's means: over all its micro-batches and processes."""

    num_valid: torch.Tensor  # next-token targets
    num_tokens: torch.Tensor  # real (non-padding) tokens
    micro_batches: int = 1
    world: int = 1

    @classmethod
    def of(cls, batches: list[dict[str, torch.Tensor]], world: int = 1, reduce=None) -> StepCounts:
        """Counts of this process's `batches`; `reduce` (an in-place all-reduce sum) makes them global."""
        targets = [next_token_labels(b["labels"]) for b in batches]
        counts = torch.stack(
            [sum((t != IGNORE_INDEX).sum() for t in targets), sum(b["attention_mask"].sum() for b in batches)]
        ).float()
        if reduce is not None:
            counts = reduce(counts)
        return cls(counts[0], counts[1], len(batches), world)


@dataclass
class Loss:
    terms: dict[str, torch.Tensor]  # each unweighted, as reduced for this micro-batch
    weighted: dict[str, torch.Tensor]  # w_k * term_k (after balancing) of the terms with w_k > 0
    total: torch.Tensor


class Objective:
    def __init__(
        self, cfg, student: nn.Module, teacher: nn.Module, total_steps: int, terms: dict[str, Term] | None = None
    ):
        self.cfg = cfg
        registry = TERMS if terms is None else terms
        self.max_weights = {name: t.max_weight(cfg) for name, t in registry.items()}
        # the computed terms: a non-zero weight, or always logged (lm)
        self.terms = {n: t for n, t in registry.items() if self.max_weights[n] > 0 or t.always}
        self.active = [n for n in self.terms if self.max_weights[n] > 0]
        # the trainable student-side modules of the terms (routers, projections): fp32, on the student's device
        built = {n: t.build(cfg, student, teacher) for n, t in self.terms.items() if t.build is not None}
        self.heads = nn.ModuleDict({n: m for n, m in built.items() if m is not None})
        self.heads.to(next(student.parameters()).device)
        on = [self.terms[n] for n in self.active]
        self.needs = Needs(
            teacher=any(t.needs.teacher for t in on),
            hidden_states=any(t.needs.hidden_states for t in on),
            attentions=any(t.needs.attentions for t in on),
        )
        # the curriculum ramps kd and lm (always listed) and every other active term
        ramped = {n: self.max_weights[n] for n in registry if n in ("kd", "lm") or n in self.active}
        self.curriculum = CurriculumScheduler.from_preset(cfg.curriculum, total_steps, ramped, parse_ramps(cfg.ramps))
        self.balancer = AdaptiveBalancer(cfg.balance_momentum) if cfg.adaptive_balance else None
        # KD + LM from the hidden states (kdlab.loss.fused) where nothing else needs the [N, V] logits
        self.fused_off = fused_unavailable(cfg, self.active, self.terms, student, teacher)
        self.fused = not self.fused_off
        if cfg.teacher_cache and cfg.teacher_cache_kind == "hidden" and not self.fused:
            raise KDLabError(
                f"teacher_cache={cfg.teacher_cache!r} holds the teacher's hidden states, which KD reads through "
                f"the fused loss, and this run cannot use it ({self.fused_off}); use a top-k cache or none"
            )
        self.last_shares: dict[str, torch.Tensor] = {}  # the last grad_shares, until a log line reads them

    # ------------------------------------------------------------------ what the forwards must give
    def needs_teacher(self, batch: dict[str, torch.Tensor]) -> bool:
        """Whether this batch needs the teacher's forward: not when every term that reads the
        teacher can read it from the batch instead (its cached top-k, or its final hidden states,
        which the fused loss turns into the full-vocabulary KD)."""
        cached = all(k in batch for k in CACHED_TEACHER_KEYS) or (self.fused and "t_hidden" in batch)
        return any(self.terms[n].needs.teacher and not (cached and self.terms[n].reads_cache) for n in self.active)

    def teacher_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the teacher's forward reads of a batch: the batch itself (kdlab.training.cross_tokenizer
        gives it its own tokens of the same text)."""
        return batch

    def match_logits(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher logits over one vocabulary (see kdlab.loss.terms.match_logits)."""
        return match_logits(self.heads["kd"] if "kd" in self.heads else None, s_logits, t_logits)

    # ------------------------------------------------------------------ the loss
    def weights(self) -> dict[str, float]:
        """This step's weights (the curriculum at the steps done so far)."""
        return self.curriculum.get_weights()

    def step(self) -> None:
        self.curriculum.step()

    def loss(
        self,
        student: nn.Module,
        teacher: nn.Module,
        batch: dict[str, torch.Tensor],
        precision: Precision,
        counts: StepCounts | None = None,
        weights: dict[str, float] | None = None,
        reduce=None,
    ) -> Loss:
        """Forwards and terms of one micro-batch. `counts`: of the whole step (default: this batch
        alone); `weights`: default this step's; `reduce`: the all-reduce the balancer needs under DDP."""
        counts = counts if counts is not None else StepCounts.of([batch])
        need = self.needs
        if self.fused and (self.needs_teacher(batch) or "t_hidden" in batch):
            return self._fused_loss(student, teacher, batch, precision, counts, weights, reduce)
        with phase("student forward"):
            s_out = student_outputs(student, batch, precision, need.hidden_states, need.attentions)
        t_out = None
        if self.needs_teacher(batch):
            with phase("teacher forward"):
                t_out = teacher_outputs(teacher, self.teacher_inputs(batch), need.hidden_states, need.attentions)
        return self.terms_of(s_out, t_out, batch, counts, weights, reduce)

    def _fused_loss(self, student, teacher, batch, precision, counts, weights, reduce) -> Loss:
        """`loss` with KD and LM by kdlab.loss.fused: both forwards stop before the LM head (logits of
        the last position only), and the two terms come from the final hidden states chunk by chunk."""
        cfg, need = self.cfg, self.needs
        weights = self.weights() if weights is None else weights
        with phase("student forward"), final_hidden_states(student) as s_h:
            s_out = student_outputs(student, batch, precision, need.hidden_states, need.attentions, logits_to_keep=1)
        if self.needs_teacher(batch):
            with phase("teacher forward"), final_hidden_states(teacher) as t_h:
                t_out = teacher_outputs(
                    teacher, self.teacher_inputs(batch), need.hidden_states, need.attentions, logits_to_keep=1
                )
            # read after the forward: under FSDP2 the root's weights (the output head) stay gathered then
            t_hidden, t_weight = t_h["h"], output_weight(teacher)
        else:  # the teacher's final hidden states from a cache (kdlab.data.teacher_cache): no forward
            t_weight = output_weight(teacher)
            t_out, t_hidden = None, batch["t_hidden"].to(t_weight.dtype)  # its logits in its own dtype
        with phase("loss: kd + lm (fused)"):
            fused = fused_linear_kd_lm(
                s_h["h"],
                output_weight(student),
                (t_hidden, t_weight),
                next_token_labels(batch["labels"]),
                kd_weight=weights.get("kd", 0.0),
                lm_weight=weights.get("lm", 0.0),
                num_valid=counts.num_valid,
                temperature=cfg.temperature,
                top_k=cfg.kd_top_k,
                divergence=cfg.kd_divergence,
                beta=cfg.jsd_beta,
                chunk_tokens=cfg.loss_chunk_tokens,
            )
        return self.terms_of(s_out, t_out, batch, counts, weights, reduce, fused=fused)

    def terms_of(
        self,
        s_out,
        t_out,
        batch: dict[str, torch.Tensor],
        counts: StepCounts,
        weights: dict[str, float] | None = None,
        reduce=None,
        fused: FusedLoss | None = None,
    ) -> Loss:
        """The terms, weighted terms and total from the models' outputs of one micro-batch (`fused`:
        KD and LM already computed by kdlab.loss.fused, their weighted gradient in fused.total)."""
        targets = next_token_labels(batch["labels"])
        mask = targets != IGNORE_INDEX
        share = batch["attention_mask"].sum() / counts.num_tokens  # this micro-batch's part of the step
        per_batch = 1.0 / (counts.micro_batches * counts.world)  # a per-batch statistic: mean over batches
        values: dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            if fused is not None and name in ("kd", "lm"):
                values[name] = fused.kd if name == "kd" else fused.lm  # no gradient: it is in fused.total
                continue
            ctx = TermContext(
                self.cfg,
                batch,
                s_out,
                t_out,
                targets,
                mask,
                counts.num_valid,
                self.heads[name] if name in self.heads else None,
                self.match_logits,
            )
            # a term at weight 0 is only logged: no graph for it
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.max_weights[name] > 0), phase(f"loss: {name}"):
                value = self.compute(name, ctx)
            values[name] = (
                value * share if term.reduce == "tokens" else value * per_batch if term.reduce == "batch" else value
            )
        scaled = self.balancer(values, reduce) if self.balancer is not None else values
        weights = self.weights() if weights is None else weights
        weighted = {k: weights[k] * v for k, v in scaled.items() if weights.get(k, 0.0) > 0}
        if fused is None:
            total = sum(weighted.values(), torch.zeros((), device=mask.device))
        else:
            total = sum((v for k, v in weighted.items() if k not in ("kd", "lm")), fused.total)
        return Loss(values, weighted, total)

    def compute(self, name: str, ctx: TermContext) -> torch.Tensor:
        """Term `name`'s value on one micro-batch: the registered compute function (a subclass may
        override it for some batches, as kdlab.training.on_policy does for text the student generated)."""
        return self.terms[name].compute(ctx)

    def grad_shares(self, weighted: dict[str, torch.Tensor], params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each weighted term's share of the sum of per-term gradient norms on `params`.

        One extra backward per active term (the graph is kept), so the trainer runs it every
        grad_share_every steps only.
        """
        norms = {}
        for name, value in weighted.items():
            if value.requires_grad:
                grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                norms[name] = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g.float()) for g in grads if g is not None])
                )
        total = sum(norms.values())
        self.last_shares = {k: v / total for k, v in norms.items()}
        return self.last_shares

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Device values for the next train record: the last gradient shares (then cleared) and the
        feature routers' statistics, keyed "share/<term>", "router<i>/entropy", "router<i>/util<e>"."""
        out = {f"share/{k}": v for k, v in self.last_shares.items()}
        self.last_shares = {}
        for layer, stats in enumerate(self.router_stats):
            out[f"router{layer}/entropy"] = stats["entropy"]
            out |= {f"router{layer}/util{e}": u for e, u in enumerate(stats["utilisation"])}
        return out

    # ------------------------------------------------------------------ diagnostics and state
    @property
    def router_stats(self) -> list[dict[str, torch.Tensor]]:
        """The feature term's last per-block router statistics (empty when it is off)."""
        return self.heads["feature"].last_stats if "feature" in self.heads else []

    def state_dict(self) -> dict:
        """Curriculum and balancer (the heads' weights are checkpointed with the student's)."""
        return {
            "curriculum": self.curriculum.state_dict(),
            "balancer": self.balancer.state_dict() if self.balancer is not None else {},
        }

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.curriculum.load_state_dict(state["curriculum"])
        if self.balancer is not None:
            self.balancer.load_state_dict(state["balancer"], device)


__all__ = ["Objective", "Loss", "StepCounts", "phase"]

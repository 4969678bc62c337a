"""Each seed variant reproduces its fault, measured against kdlab's form on the same tensors."""

import torch

from kdlab.course.original import original_kd_batchmean
from kdlab.loss.divergences import kd_loss


def test_seed_batchmean_kd_grows_with_sequence_length_while_kdlab_does_not():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 64, 50, generator=g), torch.randn(4, 64, 50, generator=g)
    mask = torch.ones(4, 64, dtype=torch.bool)
    per_token = kd_loss(s, t, mask)
    for repeat in (1, 2, 4):  # the same tokens, sequences 64, 128, 256 long
        s_r, t_r, m_r = s.repeat(1, repeat, 1), t.repeat(1, repeat, 1), mask.repeat(1, repeat)
        torch.testing.assert_close(kd_loss(s_r, t_r, m_r), per_token)
        # batchmean = sequence length x the per-token KL
        torch.testing.assert_close(original_kd_batchmean(s_r, t_r), per_token * 64 * repeat, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- early stopping (notebook 06)
class _FakeTrainer:
    def __init__(self):
        from kdlab.training.trainer import TrainState

        self.state = TrainState()


def test_seed_total_early_stopping_fires_when_a_ramp_raises_the_total():
    from kdlab.course.original import OriginalTotalEarlyStopping
    from kdlab.loss.curriculum import CurriculumScheduler

    # fixed raw terms that fall slowly; the curriculum ramps feature in over steps 10-40 of 100
    sched = CurriculumScheduler.from_preset("original", 100, {"kd": 0.5, "lm": 0.5, "feature": 1.0})
    trainer, es = _FakeTrainer(), OriginalTotalEarlyStopping(patience=10)
    watcher = OriginalTotalEarlyStopping(patience=10, stop=False)
    for step in range(1, 101):
        w = sched.weights_at(step - 1)
        raw = {"kd": 3.0 - 0.01 * step, "lm": 4.0 - 0.01 * step, "feature": 2.0}
        record = {"kind": "train", "step": step, "loss": sum(w[k] * raw[k] for k in raw)}
        for cb in (es, watcher):
            cb.on_log(trainer, record)
        cb.on_eval(trainer, {"kind": "eval", "split": "validation", "step": step, "kl": 0.0})  # ignored
        if trainer.state.should_stop:
            break
    # the total falls until the ramp starts at step 10, then rises: 10 checks later it stops
    assert (
        es.best_step == 11 and es.stopped_step == 21 and trainer.state.stop_reason.startswith("original early stopping")
    )
    assert watcher.stopped_step == 21 and len(watcher.checks) == 21
    # the same rule with a warmup past the ramp's end does not stop inside the ramp
    late = OriginalTotalEarlyStopping(patience=10, warmup_steps=40, stop=False)
    t2 = _FakeTrainer()
    for step, value, _ in watcher.checks:
        late.on_log(t2, {"kind": "train", "step": step, "loss": value})
    assert late.stopped_step is None and not t2.state.should_stop
    restored = OriginalTotalEarlyStopping(patience=10)
    restored.load_state_dict(es.state_dict())
    assert restored.state_dict() == es.state_dict()

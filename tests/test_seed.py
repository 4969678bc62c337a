"""Each seed variant reproduces its fault, measured against kdlab's form on the same tensors."""

import torch

from kdlab.losses import kd_loss
from kdlab.seed import seed_kd_batchmean


def test_seed_batchmean_kd_grows_with_sequence_length_while_kdlab_does_not():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 64, 50, generator=g), torch.randn(4, 64, 50, generator=g)
    mask = torch.ones(4, 64, dtype=torch.bool)
    per_token = kd_loss(s, t, mask)
    for repeat in (1, 2, 4):  # the same tokens, sequences 64, 128, 256 long
        s_r, t_r, m_r = s.repeat(1, repeat, 1), t.repeat(1, repeat, 1), mask.repeat(1, repeat)
        torch.testing.assert_close(kd_loss(s_r, t_r, m_r), per_token)
        # batchmean = sequence length x the per-token KL
        torch.testing.assert_close(seed_kd_batchmean(s_r, t_r), per_token * 64 * repeat, rtol=1e-5, atol=1e-5)

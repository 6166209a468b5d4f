"""Detection for conditional ablation: thresholds at a firing rate, LDA against the mean difference."""

from __future__ import annotations

import torch

from directions import detection


def test_threshold_at_fpr():
    neg = [float(x) for x in range(100)]  # 0..99
    thr = detection.threshold_at_fpr(neg, 0.05)
    assert sum(x > thr for x in neg) == 5 and 94 < thr < 95
    assert sum(x > detection.threshold_at_fpr(neg[:10], 0.05) for x in neg[:10]) == 0  # floor(0.5) = 0 may fire


def test_lda_detection_beats_the_mean_difference_when_spread_hides_the_gap():
    """Constructed data with a known answer: the classes differ by 1 on axes 0 and 1, but axis 1
    carries a within-class spread of sd 5. LDA must find ~axis 0 (Sigma^-1 dmu) and separate the
    classes; the mean difference, half on the noisy axis, cannot."""
    g = torch.Generator().manual_seed(0)
    d, n = 6, 400

    def sample(mu):
        x = torch.randn(n, d, generator=g) * 0.2
        x[:, 1] *= 25.0
        return x + torch.tensor(mu)

    pos, neg = sample([1.0, 1.0, 0, 0, 0, 0]), sample([0.0] * d)
    w = detection.lda_vector(pos, neg, shrinkage=1e-3)
    assert abs(float(w[0])) > 0.99 and float(w[0]) > 0  # the clean axis, pointing to the positives
    states = lambda x: x.unsqueeze(1)  # noqa: E731  (N, 1 layer, d)
    half = n // 2
    det = detection.calibrate_detection(
        pos.mean(0) - neg.mean(0),
        states(pos[half:]),
        states(neg[half:]),
        [0],
        fpr=0.02,
        check=(states(pos[:half]), states(neg[:half])),
        shrinkages=(1e-3,),
    )
    kinds = {c["kind"]: c for c in det.record["candidates"]}
    assert kinds["mean-diff"]["fire_pos"] < 0.5 < 0.95 < kinds["lda/0.001"]["fire_pos"]
    assert det.record["chosen_kind"] == "lda/0.001" and det.record["val_fire_neg"] <= 0.02
    assert det.record["train_fire_pos"] > 0.95

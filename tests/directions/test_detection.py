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


def test_next_token_term_separates_what_the_probe_cannot_and_the_engine_scores_the_same(tmp_path):
    """Constructed: the probe axis puts a fifth of the negatives among the positives (prompts that
    look harmful but are not refused); only the next-token term (log P of a 'refusal' token) tells
    them apart. Calibration must weigh that term in, and the stored file must score like calibration."""
    from directions.fileformat import DirectionSet, load_direction, save_direction

    g = torch.Generator().manual_seed(1)
    d, n, vocab, tok = 4, 300, 10, 7

    def sample(every, refuse):
        x = torch.randn(n, d, generator=g) * 0.3
        x[::every, 0] += 2.0  # every `every`-th prompt looks like a positive to the probe
        logits = torch.randn(n, vocab, generator=g)
        logits[:, tok] += 4.0 if refuse else -4.0
        return x, logits

    pos, pos_lg = sample(1, True)
    neg, neg_lg = sample(5, False)
    states = lambda x: x.unsqueeze(1)  # noqa: E731
    lt = lambda lg: detection.logit_term(lg, [tok])  # noqa: E731
    half = n // 2
    feats = detection.LogitFeatures((tok,), lt(pos_lg[half:]), lt(neg_lg[half:]), lt(pos_lg[:half]), lt(neg_lg[:half]))
    args = (pos.mean(0) - neg.mean(0), states(pos[half:]), states(neg[half:]), [0])
    kw = dict(fpr=0.02, check=(states(pos[:half]), states(neg[:half])), shrinkages=(0.1,))
    alone = detection.calibrate_detection(*args, **kw)
    both = detection.calibrate_detection(*args, **kw, logit=feats)
    assert alone.record["val_fire_pos"] < 0.9 < 0.98 <= both.record["val_fire_pos"]
    assert both.logit_tokens == (tok,) and both.logit_weight > 0 and both.record["chosen_logit_weight"] > 0

    ds = DirectionSet("x", torch.nn.functional.normalize(torch.randn(1, d), dim=-1), torch.ones(1))
    detection.apply_detection(ds, both)
    back = load_direction(save_direction(ds, tmp_path / "x.safetensors"))
    assert back.detect_logit_tokens == (tok,) and back.detect_logit_weight == both.logit_weight
    fired_neg = [detection.condition_score(back, neg[i], neg_lg[i]) > back.detect_threshold for i in range(half, n)]
    assert sum(fired_neg) / (n - half) == both.record["val_fire_neg"]
    assert detection.condition_score(back, neg[0], None) != detection.condition_score(back, neg[0], None)  # NaN

    # pos_mask: only the positives that count (those the model refuses) make fire_pos
    mask = torch.zeros(n - half, dtype=torch.bool)
    mask[:10] = True
    masked = detection.calibrate_detection(*args, **kw, logit=feats, pos_mask=mask)
    assert masked.record["val_positives_counted"] == 10


def test_bad_next_token_metadata_is_a_clear_error(tmp_path):
    import pytest

    from directions.fileformat import DirectionFileError, DirectionSet, load_direction, save_direction

    for md in ({"detect_logit_tokens": "[1.5]"}, {"detect_logit_tokens": "nope"}, {"detect_logit_weight": "1"}):
        ds = DirectionSet("x", torch.nn.functional.normalize(torch.randn(2, 4), dim=-1), torch.ones(2), metadata=md)
        path = save_direction(ds, tmp_path / "x.safetensors")
        with pytest.raises(DirectionFileError, match="detect_logit"):
            load_direction(path)

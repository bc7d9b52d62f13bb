"""DeepConf's measures (``itscale.lm.confidence``) against hand computation, and the validation
of ``SamplingParams.top_logprobs`` / ``stop_below`` (no model needed; the backends' side is in
``test_confidence_backends.py``, ``tests/testing/test_simulated.py`` and
``tests/integration/test_vllm_backend.py``)."""

from __future__ import annotations

import math

import pytest

from itscale.lm import confidence as conf
from itscale.types import ConfidenceStop, SamplingParams


# -- the measures ------------------------------------------------------------------------------
def test_deepconf_measures_by_hand():
    tops = [(-0.1, -2.0, -3.0), (-0.5, -1.0, -4.5), (-1.0, -1.5, -2.0), (-0.2, -3.0, -3.4)]
    c = conf.token_confidences(tops)
    assert c == pytest.approx([5.1 / 3, 6.0 / 3, 4.5 / 3, 6.6 / 3])  # C_i = -(1/k) Σ_j log P_i(j)
    assert conf.token_confidence((-0.7,)) == pytest.approx(0.7)  # k = 1: the top token's surprisal
    # groups of 2: (C1+C2)/2, (C2+C3)/2, (C3+C4)/2 = 1.85, 1.75, 1.85
    assert conf.group_confidences(c, 2) == pytest.approx([1.85, 1.75, 1.85])
    assert conf.group_confidences(c, 4) == pytest.approx([sum(c) / 4])
    assert conf.group_confidences(c[:2], 3) == pytest.approx([(c[0] + c[1]) / 2])  # shorter: the mean of what exists
    assert conf.group_confidences([], 3) == []
    assert conf.lowest_group_confidence(c, 2) == pytest.approx(1.75)
    assert conf.bottom_group_confidence(c, 2) == pytest.approx(1.75)  # max(1, ⌊0.1·3⌋) = 1 group
    groups = [float(x) for x in range(1, 31)]  # 30 tokens, window 1: groups are the tokens themselves
    assert conf.bottom_group_confidence(groups, 1) == pytest.approx(2.0)  # ⌊0.1·30⌋ = 3 lowest: (1+2+3)/3
    assert conf.bottom_group_confidence(groups, 1, fraction=0.5) == pytest.approx(8.0)
    assert conf.tail_confidence(c, 2) == pytest.approx((c[2] + c[3]) / 2)
    assert conf.tail_confidence(c, 10) == pytest.approx(sum(c) / 4)
    assert conf.average_confidence(c) == pytest.approx(sum(c) / 4)
    # s = Percentile_{100-η}: η = 10 keeps the top 10 % (numpy's linear interpolation)
    warm = [3.0, 1.0, 4.0, 2.0, 5.0]
    assert conf.online_threshold(warm, 10) == pytest.approx(4.6)  # 90th: 4 + 0.6·(5 − 4)
    assert conf.online_threshold(warm, 90) == pytest.approx(1.4)
    assert conf.online_threshold(warm, 50) == pytest.approx(3.0)


def test_window_check_fires_once_a_window_is_full_and_below():
    check = conf.WindowCheck(2, 2.0)
    c = [1.0, 3.0, 1.0, 2.0, 1.5]  # window means from the 2nd token: 2.0, 2.0, 1.5, 1.75
    assert [check.push(x) for x in c] == [False, False, False, True, True]  # 1.0 alone is no window; 2.0 is not < 2
    with pytest.raises(ValueError, match="window"):
        conf.WindowCheck(0, 1.0)
    for call in (lambda: conf.token_confidence(()), lambda: conf.lowest_group_confidence([], 2),
                 lambda: conf.online_threshold([], 10), lambda: conf.tail_confidence([], 3)):
        with pytest.raises(ValueError):
            call()


def test_validation_names_the_field():
    with pytest.raises(ValueError, match=r"SamplingParams\.top_logprobs"):
        SamplingParams(top_logprobs=21)
    with pytest.raises(ValueError, match=r"SamplingParams\.top_logprobs"):
        SamplingParams(top_logprobs=-1)
    with pytest.raises(ValueError, match=r"SamplingParams\.top_logprobs"):
        SamplingParams(top_logprobs=2.0)
    with pytest.raises(ValueError, match=r"stop_below needs SamplingParams\.top_logprobs > 0"):
        SamplingParams(stop_below=ConfidenceStop(8, 1.0))
    with pytest.raises(ValueError, match=r"SamplingParams\.stop_below must be a ConfidenceStop"):
        SamplingParams(top_logprobs=5, stop_below=(8, 1.0))
    with pytest.raises(ValueError, match=r"ConfidenceStop\.window"):
        ConfidenceStop(0, 1.0)
    with pytest.raises(ValueError, match=r"ConfidenceStop\.window"):
        ConfidenceStop(True, 1.0)
    with pytest.raises(ValueError, match=r"ConfidenceStop\.threshold"):
        ConfidenceStop(4, math.nan)
    ok = SamplingParams(top_logprobs=20, stop_below=ConfidenceStop(4, 2))
    assert ok.stop_below.threshold == 2 and SamplingParams().top_logprobs == 0

"""Helpers of the zoo that need no model: paths, metrics, the CLI wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest

from itscale import zoo
from itscale.cli import build_parser
from itscale.rewards.formats import EMBEDDED_TAG_FORMAT
from itscale.stats import auroc, pass_at_k


def test_paths_point_into_the_package():
    assert zoo.policy_path().is_dir() and (zoo.policy_path() / "config.json").is_file()
    for path in (zoo.policy_path(), zoo.prm_path()):  # the PRM folder ships once trained (issue 4)
        assert path.parent.parent == zoo.model_card_path().parent
    assert zoo.model_card_path().is_file()
    assert (zoo.PRM_TAG, zoo.PRM_GOOD, zoo.PRM_BAD) == (EMBEDDED_TAG_FORMAT.tag, EMBEDDED_TAG_FORMAT.good,
                                                        EMBEDDED_TAG_FORMAT.bad) == ("§", "+", "-")


def test_importing_the_zoo_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, itscale.zoo; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("n, c, k", [(10, 0, 1), (10, 3, 1), (10, 3, 5), (64, 1, 64), (64, 0, 64), (20, 5, 8)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    # exact: probability that a random k-subset of the n samples holds a correct one
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_auroc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.random(60) + labels * 0.3, 1)  # ties included
    pairs = [(i, j) for i in np.flatnonzero(labels) for j in np.flatnonzero(~labels)]
    expected = np.mean([1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0 for i, j in pairs])
    assert auroc(labels, scores) == pytest.approx(expected)
    assert auroc([True, False], [0.9, 0.1]) == 1.0
    assert math.isnan(auroc([True, True], [0.1, 0.2]))


def test_cli_wires_the_zoo_commands():
    parser = build_parser()
    ns = parser.parse_args(["zoo", "evaluate", "--levels", "easy", "--no-prm"])
    assert ns.func.__name__ == "_zoo_evaluate" and ns.levels == ["easy"] and ns.no_prm
    assert parser.parse_args(["zoo", "train-policy", "--steps", "3"]).steps == 3
    assert parser.parse_args(["zoo", "train-prm"]).func.__name__ == "_zoo_train_prm"
    with pytest.raises(SystemExit):
        parser.parse_args(["zoo"])


def test_near_miss_has_one_slip_and_exact_labels():
    import numpy as np

    from itscale.tasks import arithmetic
    from itscale.zoo.training import near_miss

    rng = np.random.default_rng(0)
    for problem in arithmetic.eval_set("hard")[:50]:
        steps, labels = near_miss(problem, rng)
        assert labels == arithmetic.step_labels(problem, steps)
        assert not labels[-1] and not arithmetic.is_correct(problem, "".join(steps))
        assert labels == sorted(labels, reverse=True)  # correct prefix, then wrong
        assert all(arithmetic.is_well_formed_step(s.strip()) for s in steps)
        # at most one line's arithmetic is wrong: later lines continue correctly from the slip
        wrong_sums = 0
        for line in (s.strip() for s in steps[:-1]):
            a, op, b, result = arithmetic._OP.match(line).groups()
            wrong_sums += int(result) != arithmetic.apply(int(a), op, int(b))
        assert wrong_sums <= 1

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
    for path in (zoo.policy_path(), zoo.prm_path()):
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


def test_a_bad_stop_at_is_refused_before_any_work(tmp_path, capsys):
    ns = build_parser().parse_args(["zoo", "train-prm", "--stop-at", "0", "--out", str(tmp_path / "prm"),
                                    "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert ns.func(ns) == 2
    assert "--stop-at 0: give a step of 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "prm").exists()


def _wrong_results(steps):
    """Indices of operation lines whose written result is not their own a op x."""
    from itscale.tasks import arithmetic

    out = []
    for i, step in enumerate(steps[:-1]):
        a, op, b, result = arithmetic._OP.match(step.strip()).groups()
        if int(result) != arithmetic.apply(int(a), op, int(b)):
            out.append(i)
    return out


@pytest.mark.parametrize("kind", ["off_by_1", "off_by_2_3", "off_by_10", "swapped_digits", "sign"])
def test_slipped_solution_has_one_slip_of_its_kind(kind):
    from itscale.tasks import arithmetic
    from itscale.zoo.slips import slipped_solution

    rng = np.random.default_rng(0)
    made = 0
    for problem in arithmetic.eval_set("hard")[:80]:
        got = slipped_solution(problem, kind, rng)
        if got is None:
            continue
        made += 1
        steps, k = got
        ref = arithmetic.reference_steps(*arithmetic.parse_prompt(problem.prompt))
        assert [s.strip() for s in steps[:k]] == ref[:k]  # right up to the slip
        assert _wrong_results(steps) == [k]  # one wrong result; later lines computed on from it
        true = int(ref[k].split("=")[1])
        wrong = int(steps[k].strip().split("=")[1])
        delta = abs(wrong - true)
        if kind == "off_by_1":
            assert delta == 1
        elif kind == "off_by_2_3":
            assert delta in (2, 3)
        elif kind == "off_by_10":
            assert delta == 10
        elif kind == "sign":
            assert wrong == -true != 0
        else:
            assert sorted(str(abs(wrong))) == sorted(str(abs(true))) and wrong != true
        labels = arithmetic.step_labels(problem, steps)
        assert labels == [True] * k + [False] * (len(steps) - k)
        assert arithmetic.local_step_labels(problem, steps) == [i != k for i in range(len(steps))]
        assert steps[-1] == f"Answer: {int(steps[-2].strip().split('=')[1])}"  # answers the slipped chain
    assert made >= 60


def test_slip_kinds_that_cannot_apply_give_none():
    from itscale.tasks import arithmetic
    from itscale.zoo.slips import slip_value, slipped_solution

    rng = np.random.default_rng(0)
    assert slip_value(0, "sign", rng) is None
    assert slip_value(7, "swapped_digits", rng) is None and slip_value(-44, "swapped_digits", rng) is None
    assert slip_value(-12, "swapped_digits", rng) == -21
    p = arithmetic.make_problem(1, [("+", 1), ("*", 2)], "x")  # results 2 and 4: one digit each
    assert slipped_solution(p, "swapped_digits", rng) is None
    with pytest.raises(ValueError, match="unknown slip kind"):
        slip_value(3, "off_by_one", rng)


def test_training_solutions_mix_clean_and_corrupted_lines():
    from itscale.tasks import arithmetic
    from itscale.zoo.slips import training_solution

    rng = np.random.default_rng(0)
    problems = arithmetic.problems(600, seed=5)
    solutions = [training_solution(p, rng) for p in problems]
    clean = [all(arithmetic.step_labels(p, s)) for p, s in zip(problems, solutions)]
    assert 0.15 < np.mean(clean) < 0.25  # p_clean = 0.2
    wrong_local = [arithmetic.local_step_labels(p, s).count(False) for p, s in zip(problems, solutions)]
    assert max(wrong_local) >= 3 and np.mean([w > 0 for w in wrong_local]) > 0.55
    assert all(s[-1].startswith("Answer: ") and all(x.endswith("\n") for x in s[:-1]) for s in solutions)
    assert training_solution(problems[0], np.random.default_rng(9)) == training_solution(
        problems[0], np.random.default_rng(9))  # seeded


def test_prm_example_targets_sit_where_the_loss_reads_them():
    torch = pytest.importorskip("torch")
    from itscale.tasks import arithmetic
    from itscale.zoo.evaluation import load
    from itscale.zoo.sampling import prm_encode
    from itscale.zoo.training import IGNORE, prm_example, prm_loss, right_pad

    tok, _ = load(zoo.policy_path())
    good, bad, tag = (tok.convert_tokens_to_ids(t) for t in ("+", "-", "§"))
    p = arithmetic.make_problem(7, [("+", 5), ("*", 3)], "x")
    steps = ["7+5=12\n", "12*3=35\n", "Answer: 35"]
    ids, (tag_t, local_t, digit_t, lm_t) = prm_example(tok, p, steps)
    assert ids == prm_encode(tok, p, steps)[0]
    text = tok.convert_ids_to_tokens(ids)  # one entry per token
    tags = [i for i, t in enumerate(ids) if t == tag]
    assert len(tags) == 3
    # the tag's prefix label is the target one position after the tag
    assert [tag_t[t + 1] for t in tags] == [good, bad, bad]
    assert sum(t != IGNORE for t in tag_t) == 3
    # the local label is predicted at the separator after the tag (none after the last step)
    assert [local_t[t + 2] for t in tags[:2]] == [good, bad] and sum(t != IGNORE for t in local_t) == 2
    # digit labels: predicted at each result character ("12": right, right; "35" vs 36: right, wrong)
    marked = [(text[i - 1], t) for i, t in enumerate(digit_t) if t != IGNORE]
    assert marked == [("1", good), ("2", good), ("3", good), ("5", bad)]
    # next-digit targets: the digits of the right result only, each predicted from the character before
    lm = [(text[i - 1], text[i]) for i, t in enumerate(lm_t) if t != IGNORE]
    assert lm == [("=", "1"), ("1", "2")] and all(lm_t[i] == ids[i] for i, t in enumerate(lm_t) if t != IGNORE)
    # the loss reads exactly these: a model sure of every target has ~zero loss
    digits = torch.tensor(sorted(tok.convert_tokens_to_ids(list("0123456789"))))
    targets = tuple(right_pad([t], IGNORE) for t in (tag_t, local_t, digit_t, lm_t))
    logits = torch.full((1, len(ids), len(tok)), -30.0)
    for row in targets:
        for i, t in enumerate(row[0].tolist()):
            if t != IGNORE:
                logits[0, i - 1, t] = 30.0
    loss, parts = prm_loss(logits, targets, good, bad, digits, 1.0, 1.0, 1.0)
    assert loss.item() < 1e-6, parts
    flipped = tuple(torch.where(t == good, bad, torch.where(t == bad, good, t)) for t in targets[:3]) + targets[3:]
    _, worse = prm_loss(logits, flipped, good, bad, digits, 1.0, 1.0, 1.0)
    assert worse["tag"] > 10 and worse["local"] > 10 and worse["digit"] > 10 and worse["lm"] < 1e-6
    # a sign slip: the minus is a result character with its own digit label, never a next-digit target
    ids, (_, _, digit_t, lm_t) = prm_example(tok, p, ["7+5=-12\n"])
    text = tok.convert_ids_to_tokens(ids)  # one entry per token
    assert [(text[i - 1], t) for i, t in enumerate(digit_t) if t != IGNORE] == [("-", bad), ("1", bad), ("2", bad)]
    assert all(t == IGNORE for t in lm_t)


def test_prm_encoder_reads_what_the_zoo_trains_on():
    """The shared PRMEncoder (tokenizer's chat template) gives the zoo's PRM input ids exactly:
    zoo.tokenizer.chat_prompt's text, then per step its stripped text, the tag id and the separator."""
    pytest.importorskip("torch")
    from itscale.rewards.encoding import PRMEncoder
    from itscale.tasks import arithmetic
    from itscale.zoo.evaluation import load
    from itscale.zoo.sampling import prm_encode, prm_encoder, prm_text
    from itscale.zoo.tokenizer import chat_prompt

    tok, _ = load(zoo.policy_path())
    fmt = EMBEDDED_TAG_FORMAT
    tag = tok.convert_tokens_to_ids(fmt.tag)

    def by_hand(problem, steps):
        ids = tok.encode(chat_prompt(problem.prompt), add_special_tokens=False)
        marks = []
        for step in steps:
            ids += tok.encode(fmt.strip(step, arithmetic.DELIMITER), add_special_tokens=False)
            marks.append(len(ids))
            ids += [tag] + tok.encode(fmt.separator, add_special_tokens=False)
        return ids, marks

    encoder = PRMEncoder(tok, fmt.tag, fmt.separator, delimiter=arithmetic.DELIMITER)
    assert encoder.prompt("Start at 7.")[0] == chat_prompt("Start at 7.")  # the template renders the zoo's text
    rng = np.random.default_rng(5)
    from itscale.zoo.slips import training_solution

    cases = []
    for _ in range(40):
        problem = arithmetic.make_problem(*arithmetic.generate(rng, arithmetic.Difficulty(1, 6)), "x")
        cases.append((problem, training_solution(problem, rng)))
    odd = arithmetic.make_problem(3, [("+", 4)], "odd")
    cases += [(odd, []), (odd, ["3§+4=7\n", "", "\n", "x\n\n", "Answer: 7"])]  # a tag inside a step stays text
    for problem, steps in cases:
        want = by_hand(problem, steps)
        encoded = encoder.encode(problem.prompt, steps)
        assert (encoded.ids, encoded.marks) == want == prm_encode(tok, problem, steps)
        assert encoded.text == prm_text(problem, steps)
        assert encoded.ids == tok.encode(encoded.text, add_special_tokens=False)  # one token per character
    assert prm_encoder(tok) is prm_encoder(tok)  # reused for the same tokenizer and format


def test_balanced_loss_weighs_both_classes_equally():
    torch = pytest.importorskip("torch")
    from itscale.zoo.training import IGNORE, balanced_binary_loss

    good, bad = 1, 2
    logits = torch.zeros(1, 5, 3)
    logits[0, :, good] = 1.0  # leans to "good" everywhere
    targets = torch.tensor([[good, good, good, bad, IGNORE]])
    loss = balanced_binary_loss(logits, targets, good, bad)
    p_good = torch.sigmoid(torch.tensor(1.0))
    expected = 0.5 * (-torch.log(p_good) - torch.log(1 - p_good))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert balanced_binary_loss(logits, torch.full((1, 5), IGNORE), good, bad).item() == 0.0


def test_checkpoint_refuses_other_settings_and_unasked_resumes(tmp_path):
    pytest.importorskip("torch")
    from itscale.zoo.training import Checkpoint, TrainingSetupError, _start_or_resume, build_model, make_optimizer
    from itscale.zoo.recipes import Architecture
    from itscale.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, Architecture(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=2, intermediate_size=32), seed=0)
    ckpt = Checkpoint(tmp_path, {"lr": 1e-3, "steps": 10, "threads": 2})
    ckpt.save(4, model, make_optimizer(model, 1e-3, 0.1, (0.9, 0.98)), history=[])
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(TrainingSetupError, match="at step 4 of 10; pass --resume"):
        _start_or_resume(ckpt, False, model, print)
    assert _start_or_resume(ckpt, True, model, print)["step"] == 4
    other = Checkpoint(tmp_path, {"lr": 5e-4, "steps": 10, "threads": 1})  # threads may change, lr may not
    with pytest.raises(TrainingSetupError, match=r"lr: checkpoint 0.001 vs now 0.0005") as err:
        _start_or_resume(other, True, model, print)
    assert "threads" not in str(err.value)
    assert _start_or_resume(Checkpoint(tmp_path / "new", {}), True, model, print) == {}
    with pytest.raises(TrainingSetupError, match="--resume needs --checkpoint-dir"):
        _start_or_resume(None, True, model, print)

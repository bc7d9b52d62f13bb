"""The shipped embedded model pair loads like any Hub model and behaves sensibly.

These tests read the committed folders; they never train.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from itscale import zoo  # noqa: E402
from itscale.rewards.formats import EMBEDDED_TAG_FORMAT  # noqa: E402
from itscale.tasks import arithmetic as A  # noqa: E402

FOLDERS = {"policy": zoo.policy_path(), "prm": zoo.prm_path()}
NAMES = ["policy", "prm"]
MAX_BYTES = 20 * 1024 * 1024
#: The embedded PRM's step AUROC on the 60 x 8 medium samples of ``medium_samples`` is
#: measured at 0.983 (card: 0.979 on 200 x 8); the test holds it to the card's target.
#: Measured alongside: best-of-8 / random 2.05, slip test 96.3% overall (599 pairs).
AUROC_FLOOR = 0.95


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def policy():
    tok = transformers.AutoTokenizer.from_pretrained(zoo.policy_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(zoo.policy_path())
    return tok, model.eval()


@pytest.fixture(scope="module")
def prm():
    tok = transformers.AutoTokenizer.from_pretrained(zoo.prm_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(zoo.prm_path())
    return tok, model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_folder_is_a_plain_llama_checkpoint(name):
    folder = FOLDERS[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert isinstance(config["rope_theta"], float)  # older readers (vLLM, llama.cpp) need it at top level
    assert "auto_map" not in config  # no trust_remote_code
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_cfg["chat_template"] == (folder / "chat_template.jinja").read_text()
    assert tok_cfg["eos_token"] == zoo.EOS_TOKEN
    assert (folder / "tokenizer.json").is_file()
    weights = list(folder.glob("*.safetensors"))
    assert [w.name for w in weights] == ["model.safetensors"]
    assert not list(folder.glob("*.bin"))
    for f in folder.iterdir():
        assert f.stat().st_size < MAX_BYTES, f
    args = json.loads((folder / "training_args.json").read_text())
    for key in ("args", "data", "wall_time_s", "n_parameters", "environment"):
        assert key in args
    assert args["args"]["seed"] is not None and args["args"]["steps"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_folder_loads_with_auto_classes(name, request):
    tok, model = request.getfixturevalue(name)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)  # an alias of TokenizersBackend in v5
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.config.model_type == "llama"
    assert next(model.parameters()).dtype == torch.float32
    assert 1_000_000 < model.num_parameters() < 5_000_000
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids(zoo.EOS_TOKEN)
    assert model.config.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids(zoo.PAD_TOKEN)


def test_both_models_share_one_tokenizer(policy, prm):
    assert policy[0].get_vocab() == prm[0].get_vocab()
    assert (zoo.policy_path() / "tokenizer.json").read_text() == (zoo.prm_path() / "tokenizer.json").read_text()


def test_chat_template_renders_the_prompt(policy):
    tok, _ = policy
    problem = A.eval_set("medium")[0]
    text = tok.apply_chat_template([{"role": "user", "content": problem.prompt}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == f"<|user|>{problem.prompt}<|end|><|assistant|>"
    full = tok.apply_chat_template([{"role": "user", "content": problem.prompt},
                                    {"role": "assistant", "content": A.solution_text(problem)}], tokenize=False)
    assert full == text + A.solution_text(problem) + zoo.EOS_TOKEN


@pytest.mark.parametrize("text", [
    "0123456789", "+-*=", "7+5=12\n12*3=36\n36-4=32\nAnswer: 32", "Answer: -14", "-7*2=-14\n",
    "Start at 37. Apply in order: +21, *9, -43, -2.", "7+5=12§\n12*3=35§\n", "§+-", " \n\n ",
])
def test_tokenization_round_trips_character_by_character(policy, text):
    tok, _ = policy
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_special_tokens_and_tag_tokens_are_single_tokens(policy):
    tok, _ = policy
    for t in (zoo.EOS_TOKEN, zoo.USER_TOKEN, zoo.ASSISTANT_TOKEN, zoo.PAD_TOKEN):
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    for t in (zoo.PRM_TAG, zoo.PRM_GOOD, zoo.PRM_BAD, A.DELIMITER):
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] != tok.unk_token_id
    assert tok.encode("x", add_special_tokens=True) == tok.encode("x", add_special_tokens=False)  # no BOS/EOS added
    ids = tok.encode("<|user|>1<|end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "1"
    assert zoo.PRM_TAG_FORMAT is EMBEDDED_TAG_FORMAT


def test_greedy_generation_is_well_formed(policy):
    from itscale.zoo.sampling import solve, split_steps

    tok, model = policy
    problems = A.eval_set("medium")[:6] + A.eval_set("easy")[:3]
    comps = solve(model, tok, problems, temperature=0.0, max_new_tokens=100)
    for p, (c,) in zip(problems, comps):
        lines = c.text.split(A.DELIMITER)
        assert all(A.is_well_formed_step(line) for line in lines), (p.prompt, c.text)
        assert c.eos or lines[-1].startswith("Answer:"), c
        assert len(split_steps(c.text)) == len(lines)


def test_plain_generate_matches_the_zoo_sampler(policy):
    """``model.generate`` with left padding (what a generic backend does) gives the same greedy text."""
    from itscale.zoo.sampling import solve
    from itscale.zoo.tokenizer import chat_prompt

    tok, model = policy
    problems = A.eval_set("hard")[:3]  # different prompt lengths: exercises left padding
    batch = tok([chat_prompt(p.prompt) for p in problems], return_tensors="pt", padding=True,
                add_special_tokens=False)
    assert tok.padding_side == "left"
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=100)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    ours = [c[0].text for c in solve(model, tok, problems, temperature=0.0, max_new_tokens=100)]
    assert texts == ours


@pytest.fixture(scope="module")
def medium_samples(policy):
    """8 policy samples at T = 0.8 for each of 60 held-out medium problems (the card's setting, smaller)."""
    from itscale.zoo.sampling import solve, split_steps

    tok, model = policy
    problems = A.eval_set("medium")[:60]
    comps = solve(model, tok, problems, n=8, temperature=0.8, batch_size=480, seed=1)
    return [(p, [split_steps(c.text) for c in cs]) for p, cs in zip(problems, comps)]


def _scored(scorer, medium_samples):
    """(problem, steps, step scores) of every non-empty sample, in problem order."""
    from itscale.zoo.sampling import prm_scores

    items = [(p, steps) for p, samples in medium_samples for steps in samples if steps]
    scores = prm_scores(scorer[1], scorer[0], items)
    return [(p, steps, s) for (p, steps), s in zip(items, scores)]


def _step_auroc(scored) -> float:
    """Step AUROC on the policy's own samples (the model-card measure, smaller)."""
    from itscale.stats import auroc

    return auroc([ok for p, steps, _ in scored for ok in A.step_labels(p, steps)],
                 [x for _, _, s in scored for x in s])


def _best_of_8_ratio(scored, medium_samples) -> float:
    """Accuracy of the top-scored sample (last tag) over the mean accuracy of one sample."""
    best: dict = {}
    for p, steps, s in scored:
        if p.id not in best or s[-1] > best[p.id][0]:
            best[p.id] = (s[-1], "".join(steps))
    picked = np.mean([A.is_correct(p, best[p.id][1]) if p.id in best else False for p, _ in medium_samples])
    one = np.mean([np.mean([A.is_correct(p, "".join(steps)) for steps in samples]) for p, samples in medium_samples])
    return float(picked / one)


@pytest.mark.slow
def test_prm_separates_the_policys_right_and_wrong_steps(prm, policy, medium_samples, report_statistic):
    """Step AUROC on fresh policy samples (card: >= 0.95 at every level on 200 x 8); the policy
    itself read as a PRM (untrained tags) is the broken variant."""
    trained = _step_auroc(_scored(prm, medium_samples))
    report_statistic("correct", "step AUROC, 60 problems x 8", trained, f">= {AUROC_FLOOR}")
    untrained = _step_auroc(_scored(policy, medium_samples))
    report_statistic("broken: policy as PRM", "step AUROC", untrained, f"< {AUROC_FLOOR}")
    assert trained >= AUROC_FLOOR
    assert untrained < AUROC_FLOOR


@pytest.mark.slow
def test_prm_picks_better_than_a_random_sample(prm, policy, medium_samples, report_statistic):
    """Best-of-8 by the PRM's last-tag score against one random sample (card: >= 1.3x at medium)."""
    ratio = _best_of_8_ratio(_scored(prm, medium_samples), medium_samples)
    report_statistic("correct", "best-of-8 / random", ratio, ">= 1.3")
    broken = _best_of_8_ratio(_scored(policy, medium_samples), medium_samples)
    report_statistic("broken: policy as PRM", "best-of-8 / random", broken, "< 1.3")
    assert ratio >= 1.3
    assert broken < 1.3


@pytest.mark.slow
def test_prm_catches_one_line_slips(prm, policy, report_statistic):
    """The card's slip test on 120 held-out medium problems: the reference solution must outscore
    its twin with one line's result slipped (later lines computed on from the slip) in >= 95% of
    pairs overall and >= 90% for off-by-one slips; the policy read as a PRM is at chance."""
    from itscale.zoo.evaluation import slip_test

    problems = A.eval_set("medium")[:120]
    got = slip_test(prm[1], prm[0], problems, seed=3)
    for kind, r in got.items():
        report_statistic("correct", f"slips {kind}", r["last"], f"{r['pairs']} pairs")
    broken = slip_test(policy[1], policy[0], problems, seed=3)
    report_statistic("broken: policy as PRM", "slips overall", broken["overall"]["last"], "< 0.9")
    assert got["overall"]["pairs"] >= 500
    assert got["overall"]["last"] >= 0.95
    assert got["off_by_1"]["last"] >= 0.90
    assert broken["overall"]["last"] < 0.9


def test_prm_scores_match_a_manual_forward_pass(prm):
    """The score is p(+)/(p(+)+p(-)) at each tag, read from one causal forward pass."""
    from itscale.zoo.sampling import prm_scores
    from itscale.zoo.tokenizer import chat_prompt

    tok, model = prm
    p = A.eval_set("easy")[0]
    steps = [s + "\n" for s in A.solution_text(p).split("\n")]
    text = tok.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True,
                                   tokenize=False) + EMBEDDED_TAG_FORMAT.render_steps(steps)
    assert text.startswith(chat_prompt(p.prompt))
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    tag, good, bad = (tok.convert_tokens_to_ids(t) for t in (zoo.PRM_TAG, zoo.PRM_GOOD, zoo.PRM_BAD))
    positions = (ids[0] == tag).nonzero().flatten()
    pair = logits[positions][:, [good, bad]].softmax(-1)[:, 0]
    np.testing.assert_allclose(prm_scores(model, tok, [(p, steps)])[0], pair.numpy(), rtol=1e-4, atol=1e-5)

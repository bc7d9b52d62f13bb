"""One PRM input encoding for training and every scorer, checked against ids written out by hand."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from itscale import zoo  # noqa: E402
from itscale.lm.loading import load_tokenizer  # noqa: E402
from itscale.rewards.encoding import PRMEncoder  # noqa: E402
from itscale.rewards.formats import EMBEDDED_TAG_FORMAT  # noqa: E402
from itscale.tasks import arithmetic  # noqa: E402
from itscale.types import ScoreRequest  # noqa: E402

PROBLEM = arithmetic.make_problem(7, [("+", 5), ("*", 3)], "enc")
# a '§' written by the policy inside a step must stay text, not become a step boundary
STEPS = ("7+5=12\n", "12*3=3§6\n", "Answer: 36")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(zoo.prm_path())


def by_hand(tok, prompt: str, steps, mark: str, after: str) -> tuple[list[int], list[int]]:
    """The ids the embedded models read, from the vocabulary itself: one id per character,
    the chat template's special tokens, and the mark as its own id after each stripped step."""
    vocab = tok.get_vocab()
    ids = [vocab["<|user|>"]] + [vocab[c] for c in prompt] + [vocab["<|end|>"], vocab["<|assistant|>"]]
    marks = []
    for step in steps:
        body = step[:-1] if step.endswith("\n") else step
        ids += [vocab[c] for c in body]
        marks.append(len(ids))
        ids += [vocab[mark]] + [vocab[c] for c in after]
    return ids, marks


def test_the_encoder_reads_what_the_embedded_prm_was_built_to_read(tok):
    enc = PRMEncoder(tok, EMBEDDED_TAG_FORMAT.tag, EMBEDDED_TAG_FORMAT.separator, delimiter="\n")
    out = enc.encode(PROBLEM.prompt, STEPS)
    assert (out.ids, out.marks) == by_hand(tok, PROBLEM.prompt, STEPS, "§", "\n")
    assert out.text == f"<|user|>{PROBLEM.prompt}<|end|><|assistant|>7+5=12§\n12*3=3§6§\nAnswer: 36§\n"
    assert [out.text[end - 1] for end in out.mark_ends] == ["§"] * 3
    assert out.text[: out.mark_ends[1]].endswith("12*3=3§6§")  # the prompt that scores step 2
    # piece by piece: the policy's own '§' (inside step 2) is a text token, the marks are where the steps end
    vocab = tok.get_vocab()
    assert [i for i, t in enumerate(out.ids) if t == vocab["§"]] != out.marks
    assert enc.prompt(PROBLEM.prompt)[1] == out.ids[: len(PROBLEM.prompt) + 3]


def test_training_and_every_scorer_encode_identically(tok):
    torch = pytest.importorskip("torch")  # noqa: F841
    from itscale.rewards import HFTagPRM
    from itscale.zoo.sampling import prm_encode
    from itscale.zoo.training import prm_example

    expected = by_hand(tok, PROBLEM.prompt, STEPS, "§", "\n")
    assert prm_encode(tok, PROBLEM, list(STEPS)) == expected
    assert prm_example(tok, PROBLEM, list(STEPS))[0] == expected[0]
    local = HFTagPRM.from_pretrained(zoo.prm_path(), delimiter="\n", device="cpu", run_in_thread=False)
    assert local.input_ids(ScoreRequest(PROBLEM, STEPS)) == expected


def test_the_remote_scorers_send_the_same_input(tok):
    pytest.importorskip("httpx")
    from itscale.rewards import RemoteRewardPRM, RemoteTagPRM

    tag = RemoteTagPRM("http://unused:1/v1", "prm", tokenizer=tok)
    text, ends = tag.text(ScoreRequest(PROBLEM, STEPS))
    assert tok(text, add_special_tokens=False)["input_ids"] == by_hand(tok, PROBLEM.prompt, STEPS, "§", "\n")[0]
    assert [text[e - 1] for e in ends] == ["§"] * 3
    reward = RemoteRewardPRM("http://unused:1/v1", "prm", tokenizer=tok, separator_token="§")
    assert reward.input_ids(ScoreRequest(PROBLEM, STEPS)) == by_hand(tok, PROBLEM.prompt, STEPS, "§", "")


def test_a_mark_that_is_not_one_token_is_refused(tok):
    with pytest.raises(ValueError, match="single token"):
        PRMEncoder(tok, "ки!", "\n")

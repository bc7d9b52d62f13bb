"""Unit tests of the generator's parts: inverse-CDF sampling, detokenizer, stop strings, KV store, padded batches."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest_models import make_tokenizer  # noqa: E402
from itscale.lm.detok import Detokenizer, find_stop  # noqa: E402
from itscale.lm.hf_cache import cache_kwarg, cache_states, returned_cache  # noqa: E402
from itscale.lm.kv_cache import KVNode, KVStore, new_root  # noqa: E402
from itscale.lm.prefill import PrefillBatch, left_padded_kv, left_padding_mask  # noqa: E402
from itscale.lm.sampling import sample_tokens, token_logprobs, uniform_table  # noqa: E402

LOGITS = torch.tensor([[0.0, 2.0, -1.0, 1.0, -30.0]])


def draws(logits, temperature, top_p, m=2000):
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    rows = logits.expand(m, -1)
    full = lambda x: torch.full((m,), x, dtype=torch.float64)  # noqa: E731
    counts = torch.bincount(sample_tokens(rows, full(temperature), full(top_p), u), minlength=logits.shape[1])
    return counts.double() / m


def test_inverse_cdf_reproduces_the_distribution():
    for temperature in (1.0, 0.5, 2.0):
        q = torch.softmax(LOGITS[0].double() / temperature, -1)
        assert torch.allclose(draws(LOGITS, temperature, 1.0), q, atol=1e-3)


def test_top_p_keeps_the_nucleus_renormalised():
    q = torch.softmax(LOGITS[0].double(), -1)  # order by probability: 1, 3, 0, 2, 4
    nucleus = [1, 3]  # q1 ≈ 0.64 < 0.8 <= q1 + q3
    want = torch.zeros(5, dtype=torch.float64)
    want[nucleus] = q[nucleus] / q[nucleus].sum()
    assert torch.allclose(draws(LOGITS, 1.0, 0.8), want, atol=1e-3)
    assert draws(LOGITS, 1.0, 0.5)[1] == 1.0  # the top token alone


def test_greedy_and_logprobs():
    t = torch.zeros(1, dtype=torch.float64)
    assert sample_tokens(LOGITS, t, t + 1, t + 0.99).item() == 1
    tied = torch.tensor([[1.0, 3.0, 3.0]])
    assert sample_tokens(tied, t, t + 1, t).item() == 1  # first of the maxima
    lp, top = token_logprobs(LOGITS, torch.tensor([3]))
    assert top is None and abs(lp.item() - torch.log_softmax(LOGITS[0].double(), -1)[3].item()) < 1e-12
    _, top = token_logprobs(LOGITS, torch.tensor([3]), top=2)  # the 2 largest, descending
    assert top.tolist() == [sorted(torch.log_softmax(LOGITS[0].double(), -1).tolist(), reverse=True)[:2]]


def test_uniform_rows_are_per_continuation():
    a, b = uniform_table(7, 3, 10), uniform_table(7, 5, 10)
    assert torch.equal(a, b[:3])  # continuation j's uniforms do not depend on k
    assert not torch.equal(uniform_table(8, 3, 10), a)


def test_detokenizer_offsets_with_multi_character_tokens():
    tok = make_tokenizer()
    tok.add_tokens([".\nA", "xy"])
    ids = tok.encode("1xy2.\nA3", add_special_tokens=False)
    assert len(ids) == 5
    d = Detokenizer(tok, tok.encode("<|assistant|>", add_special_tokens=False))
    for t in ids:
        d.push(t)
    assert d.text == "1xy2.\nA3"
    assert d.end == [1, 3, 4, 7, 8]
    cut = find_stop(d.text, ("\n",), 0)
    assert cut == 6 and d.kept_tokens(cut) == 3 and d.kept_text_end(3) == 4


def test_find_stop_takes_the_earliest_end():
    assert find_stop("ab\n\ncd", ("\n\n", "\n"), 0) == 3
    assert find_stop("abc", ("x",), 0) is None
    assert find_stop("a=b\n", ("\n", "="), 3) == 4  # only stops ending after position 3


def node(parent, key, n, logits=None):
    kv = ((torch.zeros(1, n, 2), torch.zeros(1, n, 2)),)  # 16 bytes per token
    return KVNode(key, parent, torch.arange(n), kv, logits=logits)


def test_kv_store_prefix_match_and_lru_eviction():
    store = KVStore(max_tokens=10)
    a = store.insert(node(store.root, "prompt", 4))
    b = store.insert(node(a, " one", 3))
    store.insert(node(a, " two", 3))
    assert store.tokens == 10
    found, covered = store.match_text("prompt one more", lambda n, pos: True)
    assert found is b and covered == len("prompt one")
    assert store.match_text("other", lambda n, pos: True) == (store.root, 0)
    store.touch(b)  # c is now the least recently used leaf
    store.insert(node(b, " x", 2))
    assert store.tokens == 12
    store.trim()
    assert store.tokens == 9 and " two" not in a.children and " one" in a.children
    assert store.match_keys(["prompt", " one", " x"])[-1].key == " x"
    # stored logits count as the KV tokens of the same memory: 20 floats = 80 bytes = 5 tokens
    assert node(None, "k", 2, logits=torch.zeros(20)).size == 2 + 5


def test_kv_store_insert_keeps_or_replaces_an_existing_key():
    store = KVStore(max_tokens=100)
    a = store.insert(node(store.root, "p", 4))
    b = store.insert(node(a, "xy", 2))  # e.g. a step cut inside a token: no logits
    assert store.insert(node(a, "xy", 2)) is b
    c = node(a, "xy", 2, logits=torch.zeros(3))
    assert store.insert(c) is b and b.logits is not None  # same ids: gains the logits
    store.insert(node(b, "z", 1))
    other = KVNode("xy", a, torch.tensor([7]), ((torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)),))
    assert store.insert(other) is other  # another tokenization replaces it, subtree and all
    assert store.tokens == 5 and store.nodes == 2 and not b.in_store


def test_kv_cache_module_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, itscale.lm.kv_cache; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefill_batch_layout():
    """Row b's L_b cached tokens fill the last L_b of P past columns; its n_b new ids the last n_b of N."""
    root = new_root()
    kv = lambda n, v: ((torch.full((1, n, 2), float(v)), torch.full((1, n, 2), -float(v))),)  # noqa: E731
    a = KVNode("abc", root, torch.arange(3), kv(3, 1.0))
    b = KVNode("x", root, torch.arange(1), kv(1, 2.0))
    batch = PrefillBatch.build([a, b, root], [[5, 6], [7, 8, 9, 10], [11]], pad_id=0)
    assert (batch.past, batch.width, batch.new_lengths) == (3, 4, [2, 4, 1])
    assert batch.input_ids.tolist() == [[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 0, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0]]
    assert [batch.column(r, 0) for r in range(3)] == [2, 0, 3]
    (keys, values), = cache_states(batch.cache)
    assert keys[:, 0, :, 0].tolist() == [[1, 1, 1], [0, 0, 2], [0, 0, 0]] and values[1, 0, 2, 0] == -2
    k, v, P = left_padded_kv([b, a], spare=5)
    assert P == 3 and k[0].shape == (2, 1, 8, 2) and k[0][0, 0, :3, 0].tolist() == [0, 0, 2]
    assert left_padding_mask(torch.tensor([3, 1]), 3).tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left_padded_kv([root]) == ([], [], 0)


def test_padded_rows_compute_what_they_compute_alone(tiny_lm):
    """Prefill two contexts of different cached and new lengths in one batch: the logits and stored
    states of each row equal those of running its whole context alone."""
    texts = [([3, 4, 5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14])]
    with torch.no_grad():
        root, bases = new_root(), []
        for past, _ in texts:  # the cached part, run alone and stored as one node
            batch = PrefillBatch.build([root], [past], pad_id=0)
            tiny_lm(**batch.inputs(torch.device("cpu")), **{cache_kwarg(tiny_lm): batch.cache, "use_cache": True})
            bases.append(KVNode("", root, torch.tensor(past), batch.new_kv(0, 0, len(past))))
        batch = PrefillBatch.build(bases, [new for _, new in texts], pad_id=0)
        out = tiny_lm(**batch.inputs(torch.device("cpu")), **{cache_kwarg(tiny_lm): batch.cache, "use_cache": True})
        for row, (past, new) in enumerate(texts):
            alone = tiny_lm(torch.tensor([past + new]), use_cache=True)
            got = out.logits[row, [batch.column(row, i) for i in range(len(new))]]
            assert torch.allclose(got, alone.logits[0, len(past):], atol=1e-5)
            k_alone = cache_states(returned_cache(alone))[0][0]  # layer 0 keys, [1, heads, L + n, head_dim]
            k_new = batch.new_kv(row, 0, len(new))[0][0]  # layer 0 keys of the new tokens, [heads, n, head_dim]
            assert torch.allclose(k_new, k_alone[0, :, len(past):], atol=1e-5)

r"""Seeded, batch-independent token sampling by inverse CDF.

Where each row's randomness comes from
--------------------------------------
A request with seed ``s`` and ``k`` continuations draws one table of uniforms
``U = torch.rand(k, max_step_tokens, generator=torch.Generator().manual_seed(s))``
(float64). Continuation ``j`` uses ``U[j, t]`` for its ``t``-th token and nothing else,
so its tokens depend only on (its context, ``s``, ``j``, the model) — not on which
other rows share the batch, how the batch is chunked, or when other rows stop.
(The model's logits themselves can differ in the last float bits between batch
shapes; a token can then flip only when ``u`` lies within that rounding of a CDF
boundary.)

The draw
--------
With temperature ``T > 0`` the sampling distribution is

    q(x) ∝ softmax(z / T)(x)  restricted to the nucleus,

where the nucleus (``top_p < 1``) is the smallest set of most probable tokens (ties
by id) whose mass reaches ``top_p``. The token is the inverse CDF at ``u``: the first
``x`` (in id order when ``top_p = 1``, by decreasing probability otherwise) with
``Σ_{x' ≤ x} q(x') > u``. ``T = 0`` is greedy: the first argmax.

The reported log-probability is always under the model's raw distribution,
``log softmax(z)(x)`` at temperature 1 before the nucleus, in float64, and so are the
top-k log-probabilities (:func:`token_logprobs` with ``top=k``): the ``k`` largest values of
``log softmax(z)``, descending.
"""

from __future__ import annotations

import torch


def uniform_table(seed: int, k: int, length: int) -> torch.Tensor:
    """``[k, length]`` float64 uniforms in [0, 1) from a generator seeded with ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed) % (2**63))
    return torch.rand((k, length), generator=gen, dtype=torch.float64)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]``; ``temperature``, ``top_p``, ``u`` are ``[B]`` float64."""
    z = logits.to(torch.float64)
    temperature, top_p, u = (x.to(z.device, torch.float64) for x in (temperature, top_p, u))
    out = torch.argmax(z, dim=-1)
    hot = temperature > 0
    if not bool(hot.any()):
        return out
    rows = hot.nonzero().squeeze(1)
    probs = torch.softmax(z[rows] / temperature[rows, None], dim=-1)
    uu, pp = u[rows], top_p[rows]
    full = pp >= 1.0
    picked = torch.empty(rows.numel(), dtype=torch.long, device=z.device)
    if bool(full.any()):
        picked[full] = _inverse_cdf(probs[full], uu[full])
    if bool((~full).any()):
        p = probs[~full]
        sp, order = torch.sort(p, dim=-1, descending=True, stable=True)
        before = sp.cumsum(-1) - sp
        sp = torch.where(before < pp[~full, None], sp, torch.zeros_like(sp))
        picked[~full] = order.gather(1, _inverse_cdf(sp, uu[~full])[:, None]).squeeze(1)
    out[rows] = picked
    return out


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First index whose cumulative weight exceeds ``u × total`` (never a zero-weight index)."""
    cum = weights.cumsum(-1)
    target = (u * cum[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cum, target, right=True).squeeze(1)
    last_positive = weights.shape[1] - 1 - torch.argmax((weights.flip(-1) > 0).to(torch.int8), dim=-1)
    return torch.minimum(idx, last_positive)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   top: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log softmax(logits)[token] per row, top)``, float64, where ``top`` (``top = k > 0``;
    else ``None``) holds the ``k`` largest values of ``log softmax(logits)`` per row,
    descending (``[B, k]``, at most the vocabulary)."""
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    picked = logp.gather(1, tokens[:, None]).squeeze(1)
    return picked, (logp.topk(min(top, logp.shape[-1]), dim=-1).values if top > 0 else None)

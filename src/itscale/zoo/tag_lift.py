"""Put the PRM's good and bad tokens on top after every tag, leaving every score unchanged.

The PRM's losses read only the difference of two logits at a tag, ℓ₊ − ℓ₋, so how much
of the full next-token distribution sits on ``+`` and ``-`` there is arbitrary (the
trained PRM puts most of it on digits). Local scoring normalises over the two tokens and
does not care, but a completions server returns only its top-k log-probabilities, and
:class:`itscale.rewards.remote.RemoteTagPRM` needs both tokens among them.

Adding one vector v to both output rows, w₊ ← w₊ + v and w₋ ← w₋ + v, adds h·v to both
logits at a position whose final hidden state is h, so

    score = σ(ℓ₊ − ℓ₋) = σ((w₊ + v)·h − (w₋ + v)·h)

is unchanged everywhere. v is the smallest vector that lifts both tokens ``margin`` nats
above every other token at every tag of the given solutions: with H the tags' hidden
states and g_t the weaker token's gap to the best other token,

    min ‖v‖²  subject to  H v ≥ margin − g,

solved as a squared-hinge penalty with L-BFGS; every tag must then clear ``margin`` − 1.
Only tag positions are ever scored, so what v does elsewhere does not matter.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..types import Problem
from .sampling import prm_encode, tag_ids
from .training import right_pad


@torch.no_grad()
def _tag_states(model, tokenizer, items: Sequence[tuple[Problem, Sequence[str]]], batch_size: int = 128):
    """Final hidden states (after the last norm) at every tag of ``items``: a (tags, hidden) tensor."""
    rows = [prm_encode(tokenizer, p, steps) for p, steps in items if steps]
    states = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = right_pad([ids for ids, _ in chunk], tokenizer.pad_token_id).to(model.device)
        hidden = model.model(input_ids=ids).last_hidden_state.float()
        for i, (_, tags) in enumerate(chunk):
            states.append(hidden[i, tags])
    return torch.cat(states)


@torch.no_grad()
def lift_tag_tokens(model, tokenizer, items: Sequence[tuple[Problem, Sequence[str]]], margin: float = 8.0,
                    strict: bool = True) -> dict:
    """Add α·μ/‖μ‖ to the output rows of the good and bad tokens (see the module docstring).

    Changes ``model`` in place and returns what it did and measured: α, the tags used and,
    before and after, the smallest margin of the weaker of the two tokens over the best
    other token. If some tag stays below ``margin`` − 1: ValueError, or with ``strict=False``
    the lift is applied anyway (scores are unchanged either way) and ``short`` says so.
    """
    model.eval()
    _, good, bad = tag_ids(tokenizer)
    h = _tag_states(model, tokenizer, items)
    weight = model.get_output_embeddings().weight
    logits = h @ weight.float().T
    others = logits.clone()
    others[:, [good, bad]] = -torch.inf
    gap = torch.minimum(logits[:, good], logits[:, bad]) - others.max(dim=1).values  # < 0: one is not on top
    need = margin - gap
    v = torch.zeros(h.shape[1], dtype=torch.float64, requires_grad=True)
    H, need64 = h.double(), need.double()
    opt = torch.optim.LBFGS([v], max_iter=500, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = 1e3 * torch.relu(need64 - H @ v).pow(2).mean() + 1e-4 * v.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        for _ in range(5):
            opt.step(objective)
    lift = v.detach()
    after = gap + (H @ lift).float()
    short = float(after.min()) < margin - 1
    if short and strict:
        raise ValueError(f"lifting left a margin of {float(after.min()):.2f} < {margin - 1} at some tag")
    weight[good] += lift.to(weight.dtype)
    weight[bad] += lift.to(weight.dtype)
    return {"short": short, "norm": round(float(lift.norm()), 4), "tags": int(h.shape[0]), "margin": margin,
            "min_gap_before": round(float(gap.min()), 3), "min_gap_after": round(float(after.min()), 3)}

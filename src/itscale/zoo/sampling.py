"""Small, dependency-free inference helpers for the embedded models.

Batched sampling with left padding and a key/value cache, and tag-style PRM
scoring. They exist so the zoo can train and evaluate itself without the
generic backends in :mod:`itscale.lm` (which have their own, richer contracts);
they share with them the transformers glue (:mod:`itscale.lm.hf_cache`) and the PRM's
input encoder (:class:`itscale.rewards.encoding.PRMEncoder`), so the PRM is trained
on exactly the input :class:`~itscale.rewards.hf.HFTagPRM` scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from ..lm.hf_cache import cache_kwarg, returned_cache
from ..rewards.encoding import PRMEncoder
from ..rewards.formats import EMBEDDED_TAG_FORMAT, TagFormat
from ..tasks import arithmetic
from ..types import Problem
from .tokenizer import chat_prompt


@dataclass(frozen=True)
class Completion:
    text: str  # generated text, without the end-of-sequence token
    eos: bool  # ended with end-of-sequence (not the token limit)
    tokens: int  # generated tokens, EOS included


def encode_plain(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[str], n: int = 1, temperature: float = 0.0,
           max_new_tokens: int = 128, batch_size: int = 256, seed: int = 0) -> list[list[Completion]]:
    """``n`` completions of each chat-formatted ``prompts[i]`` (``temperature=0``: greedy).

    Pure ancestral sampling from the softmax at ``temperature`` (no top-k/top-p).
    Rows are batched by prompt length so that little padding is computed.
    """
    model.eval()
    cache_kw = cache_kwarg(model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = encode_plain(tokenizer, prompts)
    rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
    rows.sort(key=lambda r: len(encoded[r[0]]))
    gen = torch.Generator().manual_seed(seed)
    out: list[list[Completion | None]] = [[None] * n for _ in prompts]
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        ids, mask = left_pad([encoded[i] for i, _ in chunk], pad)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits = returned_cache(res), res.logits[:, -1, :]
        last = pos[:, -1]
        done = torch.zeros(len(chunk), dtype=torch.bool)
        generated = []
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            generated.append(nxt)
            done = done | (nxt == eos)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=mask.dtype)], dim=1)
            last = last + 1
            res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
                        use_cache=True, **{cache_kw: cache})
            cache, logits = returned_cache(res), res.logits[:, -1, :]
        gen_ids = torch.stack(generated, dim=1).tolist()
        for (i, j), seq in zip(chunk, gen_ids):
            ended = eos in seq
            body = seq[:seq.index(eos)] if ended else seq
            out[i][j] = Completion(tokenizer.decode(body, skip_special_tokens=True), ended,
                                   len(body) + int(ended))
    return out  # type: ignore[return-value]


def solve(model, tokenizer, problems: Sequence[Problem], **kwargs) -> list[list[Completion]]:
    """Sample solutions for task problems (the user turn is the problem prompt)."""
    return sample(model, tokenizer, [chat_prompt(p.prompt) for p in problems], **kwargs)


def split_steps(text: str) -> list[str]:
    """Cut a solution into steps exactly as strategies do (each keeps its ``\\n``)."""
    return arithmetic.STEP_FORMAT.split(text) if text.strip() else []


def prm_text(problem: Problem, steps: Sequence[str], fmt: TagFormat = EMBEDDED_TAG_FORMAT) -> str:
    """The PRM's input: the chat prompt of the problem, then the tagged steps."""
    return chat_prompt(problem.prompt) + fmt.render_steps(steps, arithmetic.DELIMITER)


def tag_ids(tokenizer, fmt: TagFormat = EMBEDDED_TAG_FORMAT) -> tuple[int, int, int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (fmt.tag, fmt.good, fmt.bad)]
    return ids[0], ids[1], ids[2]


@lru_cache(maxsize=4)
def prm_encoder(tokenizer, fmt: TagFormat = EMBEDDED_TAG_FORMAT) -> PRMEncoder:
    """The PRM's input encoder for the arithmetic task: mark ``fmt.tag``, then ``fmt.separator``,
    steps cut at the task's delimiter (made once per tokenizer and format)."""
    return PRMEncoder(tokenizer, fmt.tag, fmt.separator, delimiter=arithmetic.DELIMITER)


def prm_encode(tokenizer, problem: Problem, steps: Sequence[str],
               fmt: TagFormat = EMBEDDED_TAG_FORMAT) -> tuple[list[int], list[int]]:
    """Token ids of :func:`prm_text` and the position of each step's tag (:meth:`PRMEncoder.encode`).

    Encoded piece by piece so that a tag character inside a step (a policy may write
    anything) is never mistaken for a step tag; for this character-level tokenizer the
    ids equal those of encoding :func:`prm_text` in one go.
    """
    encoded = prm_encoder(tokenizer, fmt).encode(problem.prompt, steps)
    return encoded.ids, encoded.marks


@torch.no_grad()
def prm_scores(model, tokenizer, items: Sequence[tuple[Problem, Sequence[str]]], batch_size: int = 128,
               fmt: TagFormat = EMBEDDED_TAG_FORMAT) -> list[list[float]]:
    """Per-step scores p(good) / (p(good) + p(bad)) at each tag, one forward pass per solution."""
    model.eval()
    _, good, bad = tag_ids(tokenizer, fmt)
    encoded = [prm_encode(tokenizer, p, s, fmt) for p, s in items]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i][0]))
    out: list[list[float]] = [[] for _ in items]
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        ids, mask = left_pad([encoded[i][0] for i in chunk], tokenizer.pad_token_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       position_ids=pos.to(model.device)).logits.cpu()
        pair = logits.float()[..., [good, bad]]
        p_good = torch.softmax(pair, dim=-1)[..., 0]
        width = ids.shape[1]
        for row, i in enumerate(chunk):
            offset = width - len(encoded[i][0])
            out[i] = p_good[row, [offset + t for t in encoded[i][1]]].tolist()
    return out

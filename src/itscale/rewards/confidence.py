r"""The policy's own confidence as a reward, so that particle filtering runs with no reward model.

Two measures of how sure a causal LM is of a solution y = (y_1..y_n) it reads after the
problem's chat prompt c (the text the policy continues, :meth:`HFGenerator.context_text`):

- *self-certainty* (Kang et al. 2025, "Scalable Best-of-N Selection for Large Language
  Models via Self-Certainty"): at each position i the divergence of the next-token
  distribution p_i from the uniform distribution over the V tokens,

      c_i = KL(U ‖ p_i) = −log V − (1/V) Σ_j log p_i(j)   ≥ 0,

  zero for a uniform (clueless) distribution and large for a peaked one; the solution's
  self-certainty is the mean of c_i over its tokens. Unlike the log-probability it does
  not depend on which token was sampled, so it is not fooled by a confident-looking
  low-probability sample; the paper finds it scales with N where the log-probability does
  not.
- *mean log-probability*: the mean of log p_i(y_i) over the solution's tokens (the
  negative per-token cross-entropy; the geometric-mean token probability is its exp).

Both are read under the model's raw distribution (temperature 1, no nucleus), as
``Step.logprob`` is. As a PRM, step t's score summarises every solution token in steps
1..t by their mean m_t, mapped into (0, 1) by

    s_t = σ(m_t − b),   b = log V for self-certainty, 0 for mean-logprob,

so that logit(s_t) = m_t − b exactly. Ranking by s_t (best-of-N, beam search) is ranking by
the measure, and particle filtering with its default ``odds`` link weights a particle by
Δℓ_t = (m_t − b)/T: weights ∝ exp(m_t/T), since the shift b cancels when weights are
normalised — for mean-logprob, the geometric-mean token probability to the power 1/T. (The
shift keeps s_t away from 0 and 1, where clipping would flatten differences: self-certainty
is typically near log V, e.g. 11–14 nats for SmolLM2's 49,152 tokens.) Each step's text
is tokenized on its own (prompt, then step by step), so s_t depends only on steps 1..t and
is cached by step prefix; a request whose prefixes are all scored costs nothing, any other is
read whole in one forward pass (``tokens`` counts all of it; the scores of its prefixes already
cached are kept, so a prefix's score never changes). A solution longer than the
model's positions scores NaN (its particle dies).

Use the policy's own model (``prm: {model: <the policy's folder or .gguf>, kind: confidence}``)
for *its* confidence; another model gives that model's confidence in the text.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..lm.loading import ChatPrompts, encode
from ..lm.prefill import tail_logits
from ..types import ScoreRequest, StepScores
from .hf import HFScorer, clip_probability
from .prefix_cache import PrefixScores

__all__ = ["MEASURES", "HFConfidencePRM", "prefix_means", "token_confidence"]

MEASURES = ("self-certainty", "mean-logprob")
_LOGITS_BUDGET = 1 << 26  # float32 logits held at once (256 MiB): bounds the rows per forward pass


def token_confidence(logits: torch.Tensor, targets: torch.Tensor, measure: str) -> torch.Tensor:
    """Per-position confidence from next-token ``logits`` ``[n, V]`` and the tokens that followed
    ``[n]``: ``KL(U ‖ p_i)`` (self-certainty) or ``log p_i(y_i)`` (mean-logprob), in float64."""
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    if measure == "mean-logprob":
        return logp.gather(-1, targets[:, None]).squeeze(-1)
    return -math.log(logp.shape[-1]) - logp.mean(dim=-1)


def prefix_means(values: Sequence[float], step_ends: Sequence[int], shift: float) -> list[float]:
    """s_t = σ(m_t − shift) for each step (module docstring), m_t the mean of the per-token
    ``values`` up to the end of step t (``step_ends``: solution tokens so far); 0.5 (no evidence)
    while no token has been read."""
    out, total, done = [], 0.0, 0
    for end in step_ends:
        total += float(sum(values[done:end]))
        done = end
        out.append(1.0 / (1.0 + math.exp(-(total / end - shift))) if end else 0.5)
    return out


class HFConfidencePRM(HFScorer):
    """A local causal LM's confidence in a solution, as a PRM (module docstring).

    ``measure`` is ``self-certainty`` or ``mean-logprob``; ``system_prompt`` must be the
    policy's, so the model reads the context the policy wrote in. ``path_or_model``,
    ``tokenizer``, ``device``, ``dtype`` as for :class:`~itscale.rewards.hf.HFTagPRM`;
    ``max_batch`` bounds the sequences per forward pass (fewer when long: at most 256 MiB of
    logits at once)."""

    kind = "causal_lm"

    def __init__(self, path_or_model: Any, tokenizer: Any = None, *, measure: str = "self-certainty",
                 max_batch: int = 16, device: Any = "auto", dtype: Any = "auto", cache_size: int = 1 << 17,
                 system_prompt: str | None = None, run_in_thread: bool = True):
        if measure not in MEASURES:
            raise ValueError(f"measure: unknown {measure!r}; choose one of {', '.join(MEASURES)}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._load(path_or_model, tokenizer, device, dtype)
        self.measure, self.max_batch, self.run_in_thread = measure, int(max_batch), run_in_thread
        self._chat = ChatPrompts(self.tokenizer, system_prompt)
        self._prompt_ids: dict[str, list[int]] = {}
        self._scores = PrefixScores(cache_size)

    def clear_cache(self) -> None:
        self._scores.clear()

    def input_ids(self, request: ScoreRequest) -> tuple[list[int], int, list[int]]:
        """The ids read (the chat prompt's, then each step's), the prompt's length, and the number of
        solution tokens up to the end of each step."""
        prompt = request.problem.prompt
        ids = self._prompt_ids.get(prompt)
        if ids is None:
            if len(self._prompt_ids) >= 4096:
                self._prompt_ids.clear()
            text, special = self._chat(prompt)
            ids = self._prompt_ids[prompt] = encode(self.tokenizer, text, add_special_tokens=special)
        out, ends = list(ids), []
        for step in request.steps:
            out += encode(self.tokenizer, step)
            ends.append(len(out) - len(ids))
        return out, len(ids), ends

    def _score(self, requests: list[ScoreRequest]) -> list[StepScores]:
        out, cached = self._scores.score_whole(requests, self._read)
        self.stats.cached_steps += cached
        return out

    def _read(self, todo: dict) -> dict:
        """Scores and tokens read for each uncached request (``PrefixScores.score_whole``)."""
        encoded = {key: self.input_ids(request) for key, request in todo.items()}
        keys = sorted(todo, key=lambda k: len(encoded[k][0]))  # similar lengths share a batch
        results: dict = {}
        for key in keys:
            ids, _, ends = encoded[key]
            if not ends or (self.max_positions and len(ids) > self.max_positions):
                results[key] = ([math.nan] * len(ends), 0)
        keys = [k for k in keys if k not in results]
        vocab = self.model.get_output_embeddings().weight.shape[0]
        start = 0
        while start < len(keys):
            chunk = keys[start:start + self.max_batch]
            while len(chunk) > 1 and len(chunk) * (max(encoded[k][2][-1] for k in chunk) + 1) * vocab > _LOGITS_BUDGET:
                chunk = chunk[: len(chunk) // 2]
            start += len(chunk)
            results.update(zip(chunk, self._forward([encoded[k] for k in chunk])))
        return {key: ([s if math.isnan(s) else clip_probability(s) for s in scores], tokens)
                for key, (scores, tokens) in results.items()}

    def _forward(self, rows: list[tuple[list[int], int, list[int]]]) -> list[tuple[list[float], int]]:
        """One left-padded pass; per row the step scores and the tokens read."""
        keep = max(ends[-1] for _, _, ends in rows) + 1  # every solution token's predicting position
        logits = tail_logits(self.model, [ids for ids, _, _ in rows], keep, self.pad_id, self.device)
        self.stats.forward_passes += 1
        self.stats.sequences += len(rows)
        out = []
        for b, (ids, _, ends) in enumerate(rows):
            n = ends[-1]  # solution tokens; the logits before token i sit at column keep − 1 − (n − i)
            window = logits[b, keep - 1 - n: keep - 1]
            values = token_confidence(window, torch.tensor(ids[len(ids) - n:], device=window.device), self.measure)
            shift = math.log(window.shape[-1]) if self.measure == "self-certainty" else 0.0
            out.append((prefix_means(values.tolist(), ends, shift), len(ids)))
            self.stats.tokens += len(ids)
            self.stats.scored_steps += len(ends)
        return out

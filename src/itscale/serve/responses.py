"""OpenAI response bodies and stream chunks built from a strategy's :class:`~itscale.types.Result`.

Choices
-------
``choices[0]`` is the method's answer (``Result.solution``). With ``n > 1`` the
further choices are the other candidates with distinct texts, heaviest first (a
text's weight is the sum of its candidates' normalised weights); when the method
ended with fewer distinct candidates than ``n``, fewer choices come back.
``finish_reason`` is ``length`` when that solution was cut short (at ``max_tokens`` or a
length limit), else ``stop``.

Usage
-----
``usage`` reports what the whole search needs, not just the returned text. It depends
only on the request and the text its search generated (so, with a local policy, a
request with a ``seed`` reports the same usage every time), never on what other
requests, of this key or another, ran before or beside it:

- ``prompt_tokens``: the policy's prompt tokens summed over its calls (each request to
  continue a particle counts its whole context once, cached or not; a local policy whose
  tokens span several characters counts a context found in its prefix cache in the
  tokens stored there, see :mod:`itscale.lm.hf`, which ``--cache-isolation per-key``
  keeps to the key's own requests);
- ``completion_tokens``: every token the policy generated for every candidate;
- ``prm_tokens``: the reward model's input tokens as if the request ran alone with an
  empty cache: the chat prompt once, plus each step once per distinct prefix the request
  had scored, counted with the PRM's tokenizer
  (:class:`~itscale.serve.engine.RequestPRM`) — not what the PRM computed, which is less
  when its caches already held some of it;
- ``total_tokens``: the sum of the three;
- ``prompt_tokens_details.cached_tokens`` (prompt tokens served from the policy's prefix
  cache instead of being prefilled): only with ``--cache-isolation per-key`` and a policy
  that reports it; it then reflects this key's own earlier and concurrent requests. With
  a shared cache it would reveal other keys' traffic, so ``prompt_tokens_details`` is
  left out.

The ``itscale`` block has the full :class:`~itscale.types.Cost`, under the same rules
(``prefilled_tokens`` is ``null`` with a shared cache; ``wall_time`` is measured).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Iterator

from ..types import Candidate, Result
from .engine import Run


def usage(result: Result) -> dict[str, Any]:
    """The ``usage`` object (module docstring). ``cost.prefilled_tokens`` is set only when the
    cache is isolated per key (:class:`~itscale.serve.engine.RequestPolicy` drops it otherwise)."""
    c = result.cost
    out: dict[str, Any] = {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.generated_tokens,
        "total_tokens": c.prompt_tokens + c.generated_tokens + c.prm_tokens,
        "prm_tokens": c.prm_tokens,
    }
    if c.prefilled_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": max(0, c.prompt_tokens - c.prefilled_tokens)}
    return out


def _chosen(result: Result) -> Candidate | None:
    for c in result.candidates:
        if c.text == result.solution:
            return c
    return None


def choices(run: Run, result: Result) -> list[tuple[str, str]]:
    """``(text, finish_reason)`` of each choice (see the module docstring)."""
    weight: dict[str, float] = {}
    first: dict[str, Candidate] = {}
    for c in result.candidates:
        weight[c.text] = weight.get(c.text, 0.0) + c.weight
        first.setdefault(c.text, c)
    order = sorted(weight, key=lambda t: -weight[t])
    texts = [result.solution or ""] + [t for t in order if t != result.solution]
    out = []
    for text in texts[:run.job.n]:
        cand = _chosen(result) if text == result.solution else first.get(text)
        particle = cand.particle if cand is not None else None
        cut = particle is not None and particle.steps and run.policy.cut(particle.steps[-1])
        out.append((text, "length" if cut else "stop"))
    return out


def itscale_block(run: Run, result: Result, queued_s: float) -> dict[str, Any]:
    job = run.job
    cands = sorted(result.candidates, key=lambda c: -c.weight)
    return {
        "method": job.method,
        "budget": job.budget,
        "params": job.params,
        "seed": job.seed,
        "status": result.status,
        "answer": result.answer,
        "exact": result.exact,
        "log_z": result.log_z,
        "candidates": [{"text": c.text, "answer": c.answer, "weight": c.weight, "score": c.score} for c in cands],
        "weights": [c.weight for c in cands],
        "cost": result.cost.as_dict(),
        "queued_s": round(queued_s, 4),
        "warnings": list(job.warnings),
        "extras": jsonable(dict(result.extras)),
    }


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON can hold it: numpy scalars as numbers, NaN and infinities as
    ``None``, tuples and sets as lists, anything else unknown as its text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return None
    return int(number) if hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu" else number


def response_body(run: Run, result: Result, queued_s: float) -> dict[str, Any]:
    """The whole non-streamed response."""
    job = run.job
    if job.kind == "chat":
        items = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason} for i, (text, reason) in enumerate(choices(run, result))]
        obj = "chat.completion"
    else:
        items = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                 for i, (text, reason) in enumerate(choices(run, result))]
        obj = "text_completion"
    return {"id": job.id, "object": obj, "created": int(time.time()), "model": job.model, "choices": items,
            "usage": usage(result), "system_fingerprint": None, "itscale": itscale_block(run, result, queued_s)}


def pieces(text: str, delimiter: str) -> list[str]:
    """The text cut after each delimiter (one streamed piece per step); they join to ``text``."""
    parts = text.split(delimiter)
    out = [p + delimiter for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return out or [""]


def chunks(run: Run, result: Result, queued_s: float, delimiter: str) -> Iterator[dict[str, Any]]:
    """The streamed answer: per choice a role chunk (chat), one chunk per step and a
    finish chunk; the last finish chunk carries the ``itscale`` block; then, with
    ``stream_options.include_usage``, a chunk with empty ``choices`` and the usage."""
    job = run.job
    created = int(time.time())
    chat = job.kind == "chat"
    head = {"id": job.id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": job.model, "system_fingerprint": None}
    if job.include_usage:
        head["usage"] = None
    picked = choices(run, result)
    for i, (text, reason) in enumerate(picked):
        if chat:
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None}]}
        for piece in pieces(text, delimiter):
            choice = ({"index": i, "delta": {"content": piece}} if chat else {"index": i, "text": piece})
            yield {**head, "choices": [{**choice, "logprobs": None, "finish_reason": None}]}
        last = {"index": i, "delta": {}} if chat else {"index": i, "text": ""}
        chunk = {**head, "choices": [{**last, "logprobs": None, "finish_reason": reason}]}
        if i == len(picked) - 1:
            chunk["itscale"] = itscale_block(run, result, queued_s)
        yield chunk
    if job.include_usage:
        yield {**head, "choices": [], "usage": usage(result)}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event carrying ``data`` (JSON unless already a string)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def sse_comment(kind: str, data: dict[str, Any]) -> str:
    """A comment line (``: kind {...}``), which SSE clients skip."""
    return f": {kind} {json.dumps(data)}\n\n"

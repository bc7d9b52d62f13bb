"""Incremental detokenization and stop strings.

Text is decoded as tokens arrive, the way vLLM does it: decode a short window of ids
ending at the newest token and emit what it adds beyond the window without that
token. The window starts with a few context ids, so tokenizers whose pieces depend
on their left neighbour (sentencepiece's leading space) decode correctly, and text is
held back while the window ends in an incomplete UTF-8 character (``"\\ufffd"``).

Each generated token ``j`` records ``end[j]``, the length of the emitted text after it,
and ``complete[j]``: whether the text up to ``end[j]`` is exactly the decoding of
tokens ``0..j`` (false for a token whose bytes only completed a character together
with a later one). :meth:`Detokenizer.kept_tokens` uses them to find how many tokens
exactly produce a given text prefix — what may be cached after a stop string cut a
continuation inside a token.
"""

from __future__ import annotations

from typing import Sequence

CONTEXT_IDS = 5


class Detokenizer:
    """The text of one continuation as its tokens arrive (``context_ids``: the ids before it)."""

    def __init__(self, tokenizer, context_ids: Sequence[int] = ()):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=False)
        else:
            self._decode = lambda ids: tokenizer.decode(
                ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        self.ids = list(context_ids)[-CONTEXT_IDS:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.prefix_text = self._decode(self.ids) if self.ids else ""
        self.text = ""
        self.end: list[int] = []
        self.complete: list[bool] = []

    def push(self, token: int) -> str:
        """Add one generated token; returns the text it completed (possibly empty)."""
        self.ids.append(int(token))
        full = self._decode(self.ids[self.prefix_offset:])
        new = ""
        if len(full) > len(self.prefix_text) and not full.endswith("\ufffd"):
            new = full[len(self.prefix_text):] if full.startswith(self.prefix_text) else self._fallback(full)
            self.text += new
            self.read_offset = len(self.ids)
            self._rewindow()
            self.complete.append(True)
        else:
            self.complete.append(False)
        self.end.append(len(self.text))
        return new

    def _rewindow(self) -> None:
        start = max(self.read_offset - CONTEXT_IDS, 0)
        self.prefix_offset = start
        self.prefix_text = self._decode(self.ids[start:self.read_offset])

    def _fallback(self, full: str) -> str:
        # decoding the longer window changed earlier characters (rare normalisation effects):
        # emit the part after the longest common prefix
        i = 0
        for a, b in zip(full, self.prefix_text):
            if a != b:
                break
            i += 1
        return full[i:]

    def flush(self) -> str:
        """At the end of a continuation: emit any held-back (incomplete) text as decoded."""
        if self.read_offset >= len(self.ids):
            return ""
        full = self._decode(self.ids[self.prefix_offset:])
        new = full[len(self.prefix_text):] if full.startswith(self.prefix_text) else self._fallback(full)
        self.text += new
        return new

    def kept_tokens(self, cut: int) -> int:
        """The most leading tokens whose decoding is exactly ``text[:end]`` with ``end <= cut``."""
        for j in range(len(self.end) - 1, -1, -1):
            if self.complete[j] and self.end[j] <= cut:
                return j + 1
        return 0

    def kept_text_end(self, n_tokens: int) -> int:
        return self.end[n_tokens - 1] if n_tokens else 0


def find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """The end of the earliest-ending stop string occurrence that ends after ``start``."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i >= 0:
            end = i + len(stop)
            if best is None or end < best:
                best = end
    return best


def generated_text(choice, text: str) -> str:
    """What a server's completion generated, whole: the concatenated token strings when the
    reply lists them and they extend ``text`` (a stop string that ended inside a token leaves
    the rest of that token out of ``text``), else ``text``."""
    tokens = getattr(choice, "tokens", None)
    joined = "".join(tokens) if tokens else ""
    return joined if len(joined) > len(text) and joined.startswith(text) else text


def split_carry(head: str, text: str, generated: str, finish: str, stops: Sequence[str]) -> tuple[str, str, str]:
    """A continuation's ``(text, carry, finish_reason)`` from what it began with (``head``, the
    previous step's carry), its text as cut, and everything it generated: the step ends right
    after the earliest stop string in ``head + generated`` and the rest is its carry (see
    :class:`~itscale.types.Step`); with no stop string in it, the text is ``head + text``."""
    whole = head + generated
    end = find_stop(whole, stops, 0) if stops else None
    if end is None:
        return head + text, "", finish
    return whole[:end], whole[end:], "stop"


def carried_step(request):
    """The next step when the request's carry already holds a stop string (no token generated),
    else ``None``."""
    from ..types import Step

    head = request.carry
    end = find_stop(head, request.stop, 0) if head and request.stop else None
    return None if end is None else Step(head[:end], 0, carry=head[end:], finish_reason="stop")

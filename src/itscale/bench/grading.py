r"""Grading bench answers against reference answers.

``Grader.grade(prediction, reference)`` takes an *extracted* answer (see
``Grader.extract``) and decides equivalence in two stages:

1. Fast path, in-process: equal ``answer_key`` (``3.0`` = ``3``, ``1,000`` = ``1000``,
   ``$x$`` = ``x``; a ``\boxed{…}`` wrapper is removed first) → True; two different
   integers → False.
2. Otherwise math-verify, so that ``\frac{1}{2}`` = ``0.5`` and ``2\sqrt{2}`` = ``\sqrt{8}``.

math-verify's own timeouts use ``signal.alarm``, which only works in the main thread
(it raises ``ValueError`` in worker threads). So its timeouts are switched off
(``parsing_timeout=None``, ``timeout_seconds=None``) and the comparison runs in a
one-worker process pool (spawn context) with our own per-call timeout instead: a
comparison that overruns returns False, and the worker is killed and replaced. This
works from any thread and from inside a running event loop. As with any spawned
process, a script that grades must keep its top-level code under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import importlib.util
import multiprocessing
import re
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Self

from ..tasks.answers import answer_key, extract_answer, last_boxed

Compare = Callable[[str, str], bool]

_INTEGER = re.compile(r"-?\d+")


def math_verify_equal(prediction: str, reference: str) -> bool:
    r"""True when math-verify finds ``prediction`` equivalent to ``reference``.

    Runs in the grader's worker process. Plain answers are wrapped as ``\boxed{…}`` so
    math-verify parses them as LaTeX; its signal-based timeouts are disabled, and its
    errors are raised (``raise_on_error=True``) so the grader can count them.
    """
    import math_verify

    gold = math_verify.parse(_as_latex(reference), parsing_timeout=None, raise_on_error=True)
    pred = math_verify.parse(_as_latex(prediction), parsing_timeout=None, raise_on_error=True)
    if not gold or not pred:
        return False
    return bool(math_verify.verify(gold, pred, timeout_seconds=None, raise_on_error=True))


def _as_latex(answer: str) -> str:
    return answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"


def _warm_up(compare: Callable[[str, str], bool]) -> bool:
    """Prepare a fresh worker so the first comparison is fast: receiving ``compare`` imports
    its module, and the default comparison's math-verify (and sympy) are imported too."""
    import logging

    # math-verify warns once per process that its timeouts are off: we enforce our own.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if compare is math_verify_equal:
        import math_verify  # noqa: F401
    return True


def _unwrap(answer: str) -> str:
    r"""The answer without surrounding whitespace, ``$…$``, trailing period or ``\boxed{}``."""
    a = answer.strip().strip("$").strip().rstrip(".").strip()
    if a.startswith("\\boxed{") and a.endswith("}") and a.count("\\boxed{") == 1:
        return last_boxed(a) or a
    return a


class GraderStartError(RuntimeError):
    """The grading worker process could not be started."""


class Grader:
    """Decides whether a predicted answer matches the reference; safe to call from any thread.

    ``compare`` is the equivalence check run in the worker process (default:
    ``math_verify_equal``; it must be a picklable module-level function). ``timeout``
    bounds each comparison in seconds; ``startup_timeout`` bounds starting a worker.
    Verdicts, timeouts included, are cached by the pair of answer keys. ``timeouts``
    and ``failures`` count comparisons that overran or raised (both graded False). Use as a context
    manager or call ``close()`` to stop the worker; a closed grader restarts it on demand.
    """

    def __init__(self, compare: Compare = math_verify_equal, *, timeout: float = 5.0,
                 startup_timeout: float = 120.0) -> None:
        if timeout <= 0 or startup_timeout <= 0:
            raise ValueError(f"timeouts must be positive, got timeout={timeout!r}, "
                             f"startup_timeout={startup_timeout!r}")
        if compare is math_verify_equal and importlib.util.find_spec("math_verify") is None:
            raise ImportError("grading needs math-verify: pip install 'itscale[bench]' (or math-verify)")
        self.compare = compare
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.timeouts = 0
        self.failures = 0
        self._cache: dict[tuple[str, str], bool] = {}
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    # -- public API -------------------------------------------------------------------

    @staticmethod
    def extract(text: str) -> str | None:
        """The final answer in a solution's text (``\\boxed{}``, an answer line, the last number)."""
        return extract_answer(text)

    def grade(self, prediction: str | None, reference: str) -> bool:
        """True when the extracted ``prediction`` is equivalent to ``reference``."""
        if prediction is None or not prediction.strip() or reference is None:
            return False
        pred, ref = _unwrap(prediction), _unwrap(reference)
        key = (answer_key(pred), answer_key(ref))
        if not key[0] or not key[1]:
            return False
        if key[0] == key[1]:
            return True
        if _INTEGER.fullmatch(key[0]) and _INTEGER.fullmatch(key[1]):
            return False
        with self._lock:
            if key not in self._cache:
                verdict = self._run_compare(pred, ref)
                if verdict is None:
                    return False
                self._cache[key] = verdict
            return self._cache[key]

    async def agrade(self, prediction: str | None, reference: str) -> bool:
        """``grade`` without blocking the event loop (runs in a thread)."""
        return await asyncio.to_thread(self.grade, prediction, reference)

    def close(self) -> None:
        """Stop the worker process (it is restarted if the grader is used again)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker process (called with the lock held) -----------------------------------

    def _run_compare(self, pred: str, ref: str) -> bool | None:
        """The comparison's verdict; None (graded False, not cached) when the worker died."""
        pool = self._ensure_pool()  # a worker that cannot start raises GraderStartError
        try:
            return bool(pool.submit(self.compare, pred, ref).result(timeout=self.timeout))
        except cf.TimeoutError:
            self.timeouts += 1
            self._discard_pool()
            return False
        except BrokenProcessPool:  # the worker died (e.g. out of memory): start a fresh one next time
            self.failures += 1
            self._discard_pool()
            return None
        except Exception:  # noqa: BLE001 - the comparison raised: graded False, counted
            self.failures += 1
            return False

    def _ensure_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            try:
                self._pool.submit(_warm_up, self.compare).result(timeout=self.startup_timeout)
            except cf.TimeoutError as e:
                self._discard_pool()
                raise GraderStartError(f"the grading worker process did not start within {self.startup_timeout} s; "
                                   "pass a larger Grader(startup_timeout=...)") from e
            except Exception as e:
                self._discard_pool()
                raise GraderStartError(f"could not start the grading worker process ({type(e).__name__}); a script "
                                   "that grades needs an `if __name__ == '__main__':` guard, as worker "
                                   "processes are spawned and re-import the main module") from e
            except BaseException:  # e.g. KeyboardInterrupt: do not leave a worker behind
                self._discard_pool()
                raise
        return self._pool

    def _discard_pool(self) -> None:
        """Kill the worker (it may be stuck in a comparison) and forget the pool."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())  # no public API before 3.14
        for process in processes:
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=5)

"""``itscale solve QUESTION``: one question answered with a scaling method, from the command line.

The models and the run are the server's, for one request: the options that name and place
the models are ``itscale serve``'s (:func:`itscale.cli.add_model_options`), they become a
:class:`~itscale.serve.config.ServeConfig` and are loaded by
:meth:`~itscale.serve.engine.Engine.load` (the one loader, :mod:`itscale.backends`); the
question runs as one :class:`~itscale.serve.jobs.Job` through ``Engine.prepare`` and
``Engine.run``, so it gets the same per-solution token cap (``--max-tokens``), the same
progress counts (:class:`~itscale.serve.engine.Progress`, which :class:`RequestPolicy` and
:class:`RequestPRM` update at every backend call) and the same ``usage`` as a request would.
Methods are named as the server and ``itscale bench --methods`` name them, with the
server's aliases (``pf``, ``bon``, ...). An empty question, an unknown method, a budget the
method cannot take, bad ``--param`` values, a method that needs the PRM with ``--prm none``
and bad settings are refused before any model loads (a question too long for the model's
context, once it is loaded), with a message naming the option or ``QUESTION`` (exit status 2).

Output: the answer, the chosen solution, one summary line, and a table of the final
candidates (the method's final particles or samples: answer, normalised weight, score
where the method has one, tokens generated), heaviest first, the chosen one marked ``*``
(the heaviest candidate with the chosen solution's text, as the server picks it).
While it runs, a progress line on standard error (when it is a terminal) counts policy
calls and tokens. ``--json`` prints one JSON object on standard output instead (and
nothing else there): ``question``, ``answer``, ``solution``, ``finish_reason`` (``length``
when the chosen solution was cut at the token limit, else ``stop``), ``status``, ``message``,
``method``, ``budget``, ``params``, ``seed``, ``candidates`` (``answer``, ``weight``,
``score``, ``tokens``, ``chosen``, ``text``; heaviest first), ``usage`` (the server's),
``cost``, ``wall_time``, ``log_z``, ``exact``, ``warnings`` and ``extras`` (what the method
reports about its run, e.g. compute_optimal's difficulty, bin and choice). A run that ends
without an answer (every particle died, or the backend failed) exits with status 1.

``--method compute_optimal`` (alias ``cob``) needs ``--allocation FILE``, the learnt policy
(:mod:`itscale.allocation`), read before any model loads; ``--budget`` then picks its cost
level (as for the server) and the text output says which bin and method the question got.

``rich`` draws the progress line and the table when it is installed (the ``bench`` extra);
plain text otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import sys
from typing import Any, TextIO

PROG = "itscale solve"
#: Shown in the table; ``--json`` lists every candidate.
TABLE_ROWS = 10
#: Strategy arguments the command sets itself (``--format``, the sampling options).
RESERVED_PARAMS = ("format", "sampling", "answer_key", "policy", "prm", "outcome")
#: Where a request field of the server's errors is a command-line option here.
_OPTIONS = {"messages": "QUESTION", "itscale.params": "--param", "itscale.budget": "--budget",
            "itscale.method": "--method"}


class SolveError(ValueError):
    """A bad option or question; the message names it (exit status 2)."""


class _Unloaded:
    """Stands in for the models while options are checked (nothing is called on it)."""


def read_question(value: str, stdin: TextIO) -> str:
    """The question: the argument, or standard input for ``-``; never empty."""
    text = stdin.read() if value == "-" else value
    text = text.strip()
    if not text:
        where = "standard input was empty" if value == "-" else "it is empty"
        raise SolveError(f"QUESTION: give the question to answer ({where}); use - to read it from standard input")
    return text


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``--param KEY=VALUE`` options: each VALUE read as JSON when it is JSON (``4``, ``0.5``,
    ``true``), else as text (``systematic``)."""
    params: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SolveError(f"--param: expected KEY=VALUE, got {item!r} (e.g. --param temperature=0.5)")
        if key in RESERVED_PARAMS:
            raise SolveError(f"--param {key}: set by {PROG} itself (see --format and the sampling options)")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def load_allocation_option(path: str | None):
    """The ``--allocation`` policy, read before any model loads (None without the option)."""
    if path is None:
        return None
    from .allocation import AllocationError, load_allocation

    try:
        return load_allocation(path)
    except AllocationError as err:
        raise SolveError(f"--allocation: {err}") from None


def check_method(method: str, budget: int, params: dict[str, Any], prm_enabled: bool, allocation=None):
    """The registered method, validated with its parameters and budget before any model loads
    (``allocation``: the ``--allocation`` policy, which ``compute_optimal`` needs)."""
    from .serve.errors import ApiError
    from .serve.methods import resolve_method
    from .strategies import STRATEGIES, make_strategy

    try:
        name = resolve_method(method, "--method")
    except ApiError as err:
        raise SolveError(err.message) from None
    if STRATEGIES[name].needs_prm and not prm_enabled:
        free = ", ".join(sorted(n for n, c in STRATEGIES.items() if not c.needs_prm))
        raise SolveError(f"--method: {name} needs a reward model, and --prm is none; use one of {free}")
    if isinstance(budget, bool) or budget < 1:
        raise SolveError(f"--budget: must be a positive integer (the method's number of samples or particles), "
                         f"got {budget}")
    server_params = {}
    if name == "compute_optimal":
        if allocation is None:
            raise SolveError("--method: compute_optimal applies a learnt allocation; give it with --allocation FILE "
                             "(the allocation.json of an `itscale bench` run with an `allocation:` section)")
        if "allocation" in params:
            raise SolveError("--param allocation: set it with --allocation FILE")
        server_params["allocation"] = allocation
    try:
        strategy = make_strategy(name, _Unloaded(), _Unloaded(), **params, **server_params)
    except ValueError as err:
        raise SolveError(f"--param: {err}") from None
    try:
        strategy.check_budget(budget)
    except ValueError as err:
        takes = strategy.budgets_up_to(max(4 * budget, 16))
        shown = ", ".join(map(str, takes[:8])) + (", ..." if len(takes) > 8 else "")
        raise SolveError(f"--budget: {err}" + (f"; it takes {shown}" if takes else "")) from None
    return name


def run_solve(ns: argparse.Namespace, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
              stderr: TextIO | None = None) -> int:
    """The ``itscale solve`` command (its options: ``itscale.cli.add_solve_parser``)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    try:
        return _solve(ns, stdin, stdout, stderr)
    except SolveError as err:
        for line in str(err).splitlines():
            print(f"{PROG}: {line}", file=stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=stderr)
        return 130


def _solve(ns: argparse.Namespace, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    from pydantic import ValidationError

    from .cli import model_settings, option_errors
    from .serve.config import Limits, ServeConfig

    question = read_question(ns.question, stdin)
    prm_enabled = ns.prm.strip().lower() != "none"
    params = parse_params(ns.param)
    allocation = load_allocation_option(getattr(ns, "allocation", None))
    method = check_method(ns.method or ("particle_filtering" if prm_enabled else "self_consistency"), ns.budget,
                          params, prm_enabled, allocation)
    try:
        config = ServeConfig(**model_settings(ns), temperature=ns.temperature, top_p=ns.top_p,
                             step_tokens=ns.step_tokens, default_method=method, default_budget=ns.budget,
                             limits=Limits(max_budget=ns.budget, max_tokens=ns.max_tokens),
                             allocation=getattr(ns, "allocation", None))
    except ValidationError as err:
        raise SolveError("\n".join(option_errors(err, {"default_method": "method", "default_budget": "budget"}))
                         ) from None
    warnings = []
    if config.policy == "embedded":
        from . import zoo

        outside = zoo.off_task(question)
        if outside:
            warnings.append(f"QUESTION: {outside}")
    for w in warnings:
        print(f"{PROG}: warning: {w}", file=stderr)

    show = _Display(stderr)
    try:
        engine = _load(config, show)
        seed = ns.seed if ns.seed is not None else secrets.randbits(63)
        run = _prepare(engine, question, method, params, config, seed, tuple(warnings))
        run.progress.listeners.append(lambda p: show.update(_progress_line(method, p.snapshot())))
        result = asyncio.run(engine.run(run))
    finally:
        show.stop()  # (before any message, so that none is drawn over)
    out = _report(run, result)
    if ns.json:
        stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    else:
        _print_report(out, stdout)
    if out["finish_reason"] == "length":
        print(f"{PROG}: warning: the chosen solution was cut short at the token limit (--max-tokens "
              f"{run.job.max_tokens}, --step-tokens {config.step_tokens})", file=stderr)
    if not result.ok:
        print(f"{PROG}: no answer ({result.status}): {result.message}", file=stderr)
        return 1
    return 0


def _load(config, show: _Display):
    """The engine with the configuration's models (errors name the option, as in serve)."""
    from .serve.engine import Engine

    if not (config.policy_spec().is_http and config.prm_spec().is_http):  # a local model: no loading bars
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    show.update(f"loading policy {config.policy!r} and PRM {config.prm!r}")
    try:
        return Engine.load(config)
    except (ValueError, FileNotFoundError) as err:  # a model that cannot be loaded or reached
        raise SolveError(str(err)) from None


def _prepare(engine, question: str, method: str, params: dict, config, seed: int, warnings: tuple[str, ...]):
    """The question as one server job, bound to this run's view of the backends."""
    from .serve.errors import ApiError
    from .serve.jobs import Job
    from .types import SamplingParams

    max_tokens = config.limits.max_tokens
    sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p,
                              max_step_tokens=min(config.step_tokens, max_tokens))
    max_budget = config.default_budget  # (one question, no key: compute_optimal may run any budget its levels learnt)
    if engine.allocation is not None:
        max_budget = max(max_budget, *(lv.max_budget for lv in engine.allocation.levels))
    job = Job(id="solve", kind="chat", model=engine.model_name, problem=question, method=method,
              budget=config.default_budget, params=params, sampling=sampling, max_tokens=max_tokens, n=1,
              seed=seed, timeout=math.inf, stream=False, include_usage=False, key_name="cli", warnings=warnings,
              budget_param="--budget", default_budget=False, max_budget=max_budget)
    try:
        return engine.prepare(job)
    except ApiError as err:  # e.g. a question longer than the model's context
        message = err.message
        for field, option in _OPTIONS.items():
            if message.startswith((field + ":", field + ".")):
                message = option + message[len(field):]
                break
        raise SolveError(message) from None


def _progress_line(method: str, p: dict) -> str:
    return (f"{method}: {p['policy_calls']} policy calls, {p['generated_tokens']} tokens, {p['prm_tokens']} PRM "
            f"tokens, {p['elapsed_s']:.1f} s")


def _report(run, result) -> dict[str, Any]:
    """The JSON object of ``--json`` (module docstring); the text output is drawn from it too."""
    from .serve.responses import jsonable, usage

    job = run.job
    cands = sorted(result.candidates, key=lambda c: -c.weight)
    chosen = next((c for c in cands if c.text == result.solution), None)  # the rule serve's responses use
    last = chosen.particle.steps[-1] if chosen is not None and chosen.particle and chosen.particle.steps else None
    return {
        "question": job.problem,
        "answer": result.answer,
        "solution": result.solution,
        "finish_reason": None if chosen is None else "length" if last is not None and run.policy.cut(last) else "stop",
        "status": result.status,
        "message": result.message,
        "method": job.method,
        "budget": job.budget,
        "params": job.params,
        "seed": job.seed,
        "candidates": [{"answer": c.answer, "weight": c.weight, "score": _finite(c.score),
                        "tokens": c.particle.generated_tokens if c.particle is not None else None,
                        "chosen": c is chosen, "text": c.text} for c in cands],
        "usage": usage(result),
        "cost": result.cost.as_dict(),
        "wall_time": result.cost.wall_time,
        "log_z": _finite(result.log_z),
        "exact": result.exact,
        "warnings": list(job.warnings),
        "extras": jsonable(dict(result.extras)),
    }


def _finite(x: float | None) -> float | None:
    """``x``, or None for what JSON cannot hold (NaN, infinities)."""
    return x if x is None or math.isfinite(x) else None


def _one_line(text: str, width: int) -> str:
    flat = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _print_report(out: dict[str, Any], stdout: TextIO) -> None:
    usage = out["usage"]
    summary = (f"{out['method']}, budget {out['budget']}, seed {out['seed']}: {usage['completion_tokens']} tokens "
               f"generated, {usage['prm_tokens']} PRM tokens, {out['wall_time']:.2f} s")
    choice = out["extras"].get("choice") if out["method"] == "compute_optimal" else None
    if choice:  # what the allocation chose for this question
        extras = out["extras"]
        chosen = "the probe's own vote" if choice["method"] == "probe" else \
            f"{choice['label'] or choice['method']} at budget {choice['budget']}"
        summary += (f"\ndifficulty {extras['difficulty']:.3g} (bin {extras['bin']} of {extras['bins']}, easiest 0) at "
                    f"the cost level of budget {extras['level']}: {chosen}")
    header = ("", "weight", "score", "tokens", "answer", "solution")
    rows = [("*" if c["chosen"] else "", f"{c['weight']:.3f}", "-" if c["score"] is None else f"{c['score']:.3f}",
             "-" if c["tokens"] is None else str(c["tokens"]), "-" if c["answer"] is None else c["answer"],
             _one_line(c["text"], 72)) for c in out["candidates"][:TABLE_ROWS]]
    more = len(out["candidates"]) - len(rows)
    note = f"{more} more candidate(s); --json lists them all" if more > 0 else ""
    if not rows:
        note = "no final candidates"
    answer = out["answer"] if out["answer"] is not None else "(none)"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"Answer: {answer}\n", file=stdout)
        if out["solution"]:
            print(out["solution"].strip() + "\n", file=stdout)
        print(summary + "\n", file=stdout)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows] if rows else []:
            print("  ".join(cell.rjust(w) if 0 < i < 4 else cell.ljust(w)
                            for i, (cell, w) in enumerate(zip(r, widths))).rstrip(), file=stdout)
        if note:
            print(note, file=stdout)
        return
    console = Console(file=stdout, highlight=False, soft_wrap=True)
    console.print(f"[bold]Answer: {_escape(answer)}[/bold]\n")
    if out["solution"]:
        console.print(_escape(out["solution"].strip()) + "\n")
    console.print(_escape(summary))
    if not rows:
        console.print(note)
        return
    table = Table(title="final candidates, heaviest first (* the chosen one)", title_justify="left")
    widths = [min(max(len(r[i]) for r in [header, *rows]), 24) for i in range(len(header) - 1)]
    for i, name in enumerate(header[:-1]):
        table.add_column(name, justify="right" if 0 < i < 4 else "left", no_wrap=True, min_width=max(widths[i], 1),
                         overflow="ellipsis")
    wide = Console(file=stdout, highlight=False)
    room = wide.width - sum(widths) - 3 * len(header) - 1  # the solution gives way to a narrow terminal
    table.add_column(header[-1], no_wrap=True, overflow="ellipsis", max_width=max(room, 12))
    for r in rows:
        table.add_row(*(_escape(cell) for cell in r))
    wide.print(table)
    if note:
        console.print(note)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class _Display:
    """The progress line on standard error, only when it is a terminal (rich's status line
    when rich is installed, else a line rewritten in place)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.live = bool(getattr(stream, "isatty", lambda: False)())
        self.status = None
        self.width = 0

    def update(self, text: str) -> None:
        if not self.live:
            return
        try:
            from rich.console import Console
        except ImportError:
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.width = len(text)
            return
        if self.status is None:
            self.status = Console(file=self.stream, highlight=False).status(_escape(text))
            self.status.start()
        else:
            self.status.update(_escape(text))

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
        elif self.live and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0

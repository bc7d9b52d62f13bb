r"""Problem sets for the bench: bundled synthetic sets or JSONL/Parquet files.

``load_problems(source)`` takes either a bundled set, ``arithmetic:easy|medium|hard``
(the task's own prompt format; a template is applied only when given explicitly), a
shipped problem file by name, ``word_problems:v1`` (:mod:`itscale.tasks.word_problems`;
read like any file, so the ``boxed`` template applies unless another is given), or
a path to a ``.jsonl`` or ``.parquet`` file whose rows have ``problem`` and ``answer``
fields, plus optional ``id`` and ``level``. Rows as the common datasets write them are read
without renaming:

- GSM8K: ``question`` is the problem, and the reference is what follows the last ``####``
  of ``answer`` (``"...so 48 + 24 = 72 clips.\n#### 72"`` → ``72``; thousands separators dropped);
- MATH: ``problem`` with a worked ``solution`` and no ``answer``: the reference is the
  solution's last ``\boxed{...}``.

Every other field goes into ``Problem.meta``, and so does the raw question text, as
``meta["problem"]`` (the prompt is the question put through a template).

Templates are named entries of ``TEMPLATES`` or a custom string containing
``{problem}``. Only that placeholder is replaced, so LaTeX braces such as ``\boxed{}``
need no escaping.

A malformed row is reported with the file, its line (JSONL, 1-based) or row index
(Parquet, 0-based) and the field, e.g. ``data.jsonl:17: missing field 'answer'``.
With ``on_bad_row="fail"`` (the default) the first one raises ``ProblemSetError``;
with ``"skip"`` it is recorded in ``ProblemSet.skipped`` and passed to ``warn``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..tasks import arithmetic, word_problems
from ..types import Problem

BUNDLED_PREFIX = "arithmetic:"
#: Problem files shipped with the package, by the name a config gives as ``problems.source``.
SHIPPED_FILES: Mapping[str, Callable[[], Path]] = {word_problems.NAME: word_problems.data_path}
BUNDLED_SETS = tuple(f"{BUNDLED_PREFIX}{level}" for level in arithmetic.LEVELS) + tuple(SHIPPED_FILES)
DEFAULT_FILE_TEMPLATE = "boxed"
TASK_TEMPLATE = "task"  # the template name recorded for bundled sets used as shipped
CUSTOM_TEMPLATE = "custom"

TEMPLATES: Mapping[str, str] = {
    "plain": "{problem}",
    "boxed": "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "steps": (
        "{problem}\n"
        "Solve this step by step. Write one step per paragraph, separating steps with a blank "
        "line, and put your final answer within \\boxed{}."
    ),
}

_SKIP_HINT = "use on_bad_row='skip' to skip such rows"


class ProblemSetError(ValueError):
    """A problem set could not be loaded: unknown source, bad file or malformed row."""


@dataclass(frozen=True)
class ProblemSet:
    """Loaded problems, the template that made their prompts, and the rows skipped."""

    name: str
    problems: tuple[Problem, ...]
    template: str
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def fingerprint(self) -> str:
        """sha256 hex digest of every problem's id, prompt and answer (for config hashes)."""
        h = hashlib.sha256()
        for p in self.problems:
            h.update(json.dumps([p.id, p.prompt, p.answer], ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()


def resolve_template(template: str) -> tuple[str, str]:
    """(name, text) for a registered template name or a custom string with ``{problem}``."""
    if template in TEMPLATES:
        return template, TEMPLATES[template]
    if "{problem}" not in template:
        raise ProblemSetError(
            f"unknown template {template!r}: use one of {sorted(TEMPLATES)} "
            "or a custom template string containing '{problem}'"
        )
    return CUSTOM_TEMPLATE, template


def apply_template(text: str, problem: str) -> str:
    """Substitute ``{problem}`` (and only it) in a template's text."""
    return text.replace("{problem}", problem)


def load_problems(
    source: str,
    *,
    template: str | None = None,
    limit: int | None = None,
    on_bad_row: Literal["fail", "skip"] = "fail",
    warn: Callable[[str], None] | None = None,
) -> ProblemSet:
    """Load a bundled set (``arithmetic:<level>``, ``word_problems:v1``) or a ``.jsonl``/``.parquet`` file.

    ``template`` names an entry of ``TEMPLATES`` or is a custom string containing
    ``{problem}``; files default to ``"boxed"``, bundled sets keep their own prompts
    unless a template is given. ``limit`` keeps the first N problems (later rows are
    not read). ``warn`` receives each skipped row's message when ``on_bad_row="skip"``.
    """
    if on_bad_row not in ("fail", "skip"):
        raise ProblemSetError(f"on_bad_row must be 'fail' or 'skip', got {on_bad_row!r}")
    if limit is not None and limit < 1:
        raise ProblemSetError(f"limit must be a positive number of problems, got {limit!r}")
    source = str(source)
    if source.startswith(BUNDLED_PREFIX):
        return _load_bundled(source, template, limit)
    if source in SHIPPED_FILES:
        pset = _load_file(SHIPPED_FILES[source](), template or DEFAULT_FILE_TEMPLATE, limit, on_bad_row, warn)
        return ProblemSet(source, pset.problems, pset.template, pset.skipped)
    return _load_file(Path(source), template or DEFAULT_FILE_TEMPLATE, limit, on_bad_row, warn)


def _load_bundled(source: str, template: str | None, limit: int | None) -> ProblemSet:
    level = source[len(BUNDLED_PREFIX):]
    if level not in arithmetic.LEVELS:
        raise ProblemSetError(f"unknown bundled set {source!r}; choose one of {', '.join(BUNDLED_SETS)}")
    problems = arithmetic.eval_set(level)[:limit]
    name = TASK_TEMPLATE
    if template is not None:
        name, text = resolve_template(template)
        problems = [
            Problem(p.id, apply_template(text, p.prompt), p.answer, {**p.meta, "problem": p.prompt})
            for p in problems
        ]
    return ProblemSet(source, tuple(problems), name)


def _load_file(path: Path, template: str, limit: int | None, on_bad_row: str,
               warn: Callable[[str], None] | None) -> ProblemSet:
    template_name, template_text = resolve_template(template)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise ProblemSetError(
            f"unsupported problem file {str(path)!r}: expected a .jsonl or .parquet file "
            f"(or a bundled set: {', '.join(BUNDLED_SETS)})"
        )
    if not path.is_file():
        raise ProblemSetError(
            f"problem file {str(path)!r} does not exist (bundled sets: {', '.join(BUNDLED_SETS)})"
        )
    rows = _jsonl_rows(path) if suffix == ".jsonl" else _parquet_rows(path)

    problems: list[Problem] = []
    skipped: list[str] = []
    first_seen: dict[str, str] = {}
    with closing(rows):
        for index, (where, row) in enumerate(rows):
            if limit is not None and len(problems) >= limit:
                break
            try:
                problem = _problem_from_row(row, f"{path.stem}-{index}", template_text)
                if problem.id in first_seen:
                    raise _RowError(f"duplicate id {problem.id!r} in field 'id' (first used at "
                                    f"{first_seen[problem.id]}); ids must be unique")
            except _RowError as e:
                message = f"{path}:{where}: {e}"
                if on_bad_row == "fail":
                    raise ProblemSetError(f"{message} ({_SKIP_HINT})") from None
                skipped.append(message)
                if warn is not None:
                    warn(message)
                continue
            first_seen[problem.id] = where if where.startswith("row") else f"line {where}"
            problems.append(problem)

    if not problems:
        detail = f"; all {len(skipped)} rows were malformed" if skipped else ""
        raise ProblemSetError(f"problem file {str(path)!r} has no problems{detail}")
    return ProblemSet(path.stem, tuple(problems), template_name, tuple(skipped))


class _RowError(Exception):
    """A malformed row; the loader adds the file and line."""


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(line number, parsed value or _RowError) for every non-blank line."""
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield str(lineno), json.loads(line)
                except json.JSONDecodeError as e:
                    yield str(lineno), _RowError(f"invalid JSON ({e.msg} at column {e.colno})")
    except UnicodeDecodeError as e:
        raise ProblemSetError(f"problem file {str(path)!r} is not UTF-8 text ({e.reason})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(``row i``, dict) for every row of a Parquet file (0-based row index)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ProblemSetError("reading Parquet files needs pyarrow: pip install 'itscale[bench]'") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise ProblemSetError(f"cannot read Parquet file {str(path)!r}: {e}") from None
    columns = set(table.column_names)
    if not ({"problem", "question"} & columns and {"answer", "solution"} & columns):
        raise ProblemSetError(
            f"{path}: no problem or answer column (columns: {', '.join(table.column_names)}); rows need "
            "'problem' and 'answer' fields (or GSM8K's 'question' and 'answer', or MATH's 'problem' and 'solution')"
        )
    for i, row in enumerate(table.to_pylist()):
        yield f"row {i}", row


def _problem_from_row(row: Any, default_id: str, template_text: str) -> Problem:
    if isinstance(row, _RowError):
        raise row
    if not isinstance(row, dict):
        raise _RowError(f"row must be a JSON object with 'problem' and 'answer' fields, got {_kind(row)}")
    question_field = "question" if row.get("problem") is None and row.get("question") is not None else "problem"
    question = _required_text(row, question_field, numbers_ok=False)
    answer = _reference(row)
    problem_id = _optional_text(row, "id") or default_id
    meta = {k: v for k, v in row.items() if k not in ("id", question_field, "answer", "level")}
    if isinstance(row.get("answer"), str) and "####" in row["answer"]:  # GSM8K: keep the worked solution
        meta.setdefault("solution", row["answer"])
    level = _optional_text(row, "level")
    if level is not None:
        meta["level"] = level
    meta["problem"] = question
    return Problem(problem_id, apply_template(template_text, question), answer, meta)


def _reference(row: dict) -> str:
    """The reference answer: ``answer`` (after its last ``####``, GSM8K), else the last
    ``\boxed{}`` of ``solution`` (MATH)."""
    from ..tasks.answers import last_boxed

    if row.get("answer") is None and row.get("solution") is not None:
        solution = _as_text(row["solution"], "solution", numbers_ok=False)
        boxed = last_boxed(solution)
        if not boxed:
            raise _RowError("field 'solution' has no \\boxed{...} answer, and there is no 'answer' field")
        return boxed
    answer = _required_text(row, "answer", numbers_ok=True)
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
        if not answer:
            raise _RowError("field 'answer' has nothing after its '####'")
    return answer


def _required_text(row: dict, field: str, *, numbers_ok: bool) -> str:
    if row.get(field) is None:
        raise _RowError(f"missing field {field!r}")
    value = _as_text(row[field], field, numbers_ok=numbers_ok)
    if not value.strip():
        raise _RowError(f"field {field!r} is empty")
    return value


def _optional_text(row: dict, field: str) -> str | None:
    """An optional string-or-integer field (``id``, ``level``) as text; None when absent."""
    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _RowError(f"field {field!r} must be a string or an integer, got {_kind(value)}")
    if not value.strip():
        raise _RowError(f"field {field!r} is empty")
    return value


def _as_text(value: Any, field: str, *, numbers_ok: bool) -> str:
    if isinstance(value, str):
        return value
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float):
            if not math.isfinite(value):
                raise _RowError(f"field {field!r} must be a finite number, got {value!r}")
            return str(int(value)) if value.is_integer() else repr(value)
        return str(value)
    expected = "a string or a number" if numbers_ok else "a string"
    raise _RowError(f"field {field!r} must be {expected}, got {_kind(value)}")


def _kind(value: Any) -> str:
    """A JSON-flavoured name for a value's type, for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def embedded_fit_warnings(pset: ProblemSet, template_given: bool) -> list[str]:
    """What a user should know before the embedded policy answers ``pset``: a template that adds
    text it was never trained on, and problems outside its arithmetic task."""
    from .. import zoo

    out = []
    if template_given and pset.template not in (zoo.PROMPT_TEMPLATE, TASK_TEMPLATE):
        out.append(f"problems.template: the embedded policy was trained on the task's bare prompts; template "
                   f"{pset.template!r} adds text it never saw, which costs accuracy (use template: "
                   f"{zoo.PROMPT_TEMPLATE})")
    outside = [p for p in pset.problems if zoo.off_task(p.meta.get("problem", p.prompt))]
    if outside:
        out.append(f"problems.source: {len(outside)} of {len(pset.problems)} problems are not prompts of the "
                   f"arithmetic task the embedded policy knows (e.g. {outside[0].id}: "
                   f"{zoo.off_task(outside[0].meta.get('problem', outside[0].prompt))})")
    return out

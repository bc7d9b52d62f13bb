"""A small set of arithmetic word problems for a real, weak instruct model.

``word_problems_v1.jsonl`` (in ``tasks/data``) holds 100 short English word problems with
whole-number answers, written for the real-model tier (SmolLM2-135M-Instruct, which can
sometimes solve a one- or two-step problem such as "Sam has 5 apples and gets 3 more. How
many apples does Sam have now?"). Each problem is one of :data:`TEMPLATES`, 42 templates
over six topics (buying, sharing, ages, speeds, money, time) plus everyday counting, filled
with a name (two for some templates), an object, and small numbers; every template is used
two or three times. Each takes 1–3 arithmetic operations (``steps``: the operations in its
answer's expression; 38 one-step, 48 two-step, 14 three-step problems), every intermediate
value is a non-negative whole number (divisions come out even), and answers lie between 1
and 250. Every prompt is a natural question that ends by asking for the answer.

How it was made: :func:`build` draws from ``random.Random(SEED)`` through ``random()``
only (the one output Python guarantees across versions), so the set is a pure function
of :data:`SEED` and the templates. Templates are visited in a shuffled order, cycling
until :data:`SIZE` problems are made; a template's numbers are drawn again until its
constraints hold, every intermediate value is a non-negative whole number, the answer
is at most 250, and the prompt is new. ``python -m itscale.tasks.word_problems``
rewrites the shipped file; ``tests/tasks/test_word_problems.py`` checks that the file is
exactly what :func:`build` produces and recomputes every answer independently.

A row: ``id``, ``problem``, ``answer`` (a string, as in the arithmetic sets), ``steps``,
``topic``, ``template``, ``numbers`` (the numbers the prompt states, by name) and
``expression`` (the answer's arithmetic with those numbers, e.g. ``"(30 - 6) / 4"``).
``itscale bench`` loads it by name as ``word_problems:v1`` (``problems.source``); the
bench's problem loader keeps the extra fields in ``Problem.meta``.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path

from ..types import Problem

VERSION = "v1"
SEED = 20_250_917
SIZE = 100
MAX_ANSWER = 250
NAME = f"word_problems:{VERSION}"  # the name ``itscale bench`` knows it by
FILE_NAME = f"word_problems_{VERSION}.jsonl"

NAMES = ("Sam", "Maya", "Leo", "Priya", "Omar", "Lucy", "Ben", "Aisha", "Carlos", "Emma", "Kenji", "Zoe",
         "Noah", "Fatima", "Ivan", "Grace", "Tariq", "Mia", "Diego", "Hannah", "Ravi", "Chloe", "Jonas",
         "Amara", "Luis", "Nora", "Yuki", "Ella", "Marco", "Sofia")

#: (plural, singular) of things one has, collects and shares.
THINGS = (("apples", "apple"), ("pencils", "pencil"), ("stickers", "sticker"), ("marbles", "marble"),
          ("cookies", "cookie"), ("books", "book"), ("cards", "card"), ("shells", "shell"),
          ("toy cars", "toy car"), ("oranges", "orange"), ("crayons", "crayon"), ("buttons", "button"))
#: (plural, singular) of things one buys.
GOODS = (("notebooks", "notebook"), ("sandwiches", "sandwich"), ("comic books", "comic book"),
         ("water bottles", "water bottle"), ("kites", "kite"), ("puzzles", "puzzle"), ("mugs", "mug"),
         ("tickets", "ticket"), ("plants", "plant"), ("pens", "pen"))


@dataclass(frozen=True)
class Template:
    """One kind of problem.

    ``text`` is a format string over ``{name}``, ``{name2}``, ``{things}``/``{thing}``
    (``kind`` says which list fills them) and the numbers. ``draw`` gives each drawn number
    its range, a pair ``(low, high)`` (inclusive), or its choices (three or more); ``derive``
    computes further numbers from them, in order; ``require`` is a condition they must
    meet; ``answer`` is the answer's expression. Expressions use ``+ - * /``, parentheses,
    comparisons and ``and``."""

    id: str
    topic: str
    text: str
    answer: str
    draw: Mapping[str, tuple[int, ...]]
    derive: Mapping[str, str] = field(default_factory=dict)
    require: str | None = None
    kind: str = "things"  # or "goods"

    def __post_init__(self) -> None:
        for k, spec in self.draw.items():
            if len(spec) < 2 or (len(spec) == 2 and not spec[0] < spec[1]):
                raise ValueError(f"template {self.id!r}: draw[{k!r}] must be (low, high) with low < high, "
                                 f"or three or more choices; got {spec!r}")

    @property
    def shown(self) -> tuple[str, ...]:
        """The numbers the prompt states, in order of appearance."""
        names = [f for _, f, _, _ in string.Formatter().parse(self.text) if f]
        out = []
        for n in names:
            if n not in ("name", "name2", "things", "thing") and n not in out:
                out.append(n)
        return tuple(out)

    @property
    def steps(self) -> int:
        """The arithmetic operations in the answer's expression."""
        return sum(isinstance(node, ast.BinOp) for node in ast.walk(ast.parse(self.answer, mode="eval")))


T = Template
TEMPLATES: tuple[Template, ...] = (
    # -- buying
    T("buy_total", "buying", "{name} buys {a} {things} that cost {p} dollars each. How many dollars does {name} "
      "spend?", "a * p", {"a": (2, 9), "p": (2, 9)}, kind="goods"),
    T("buy_change", "buying", "{name} buys {a} {things} for {p} dollars each and pays with a {bill}-dollar bill. "
      "How many dollars of change does {name} get?", "bill - a * p",
      {"a": (2, 6), "p": (2, 8), "bill": (20, 50, 100)}, require="bill > a * p", kind="goods"),
    T("buy_afford", "buying", "{name} has {m} dollars. One {thing} costs {p} dollars. How many {things} can "
      "{name} buy with all of the money?", "m / p", {"p": (2, 9), "q": (2, 9)}, {"m": "p * q"}, kind="goods"),
    T("buy_left", "buying", "{name} has {m} dollars and buys {a} {things} that cost {p} dollars each. How many "
      "dollars does {name} have left?", "m - a * p", {"m": (20, 60), "a": (2, 5), "p": (2, 9)},
      require="m > a * p", kind="goods"),
    T("buy_two_kinds", "buying", "{name} buys {a} {things} for {p} dollars each and {b} pencils for {q} dollars "
      "each. How many dollars does {name} spend in total?", "a * p + b * q",
      {"a": (2, 5), "p": (3, 9), "b": (2, 6), "q": (2, 3)}, kind="goods"),
    T("buy_tickets", "buying", "A museum ticket costs {a} dollars for an adult and {c} dollars for a child. How "
      "many dollars do {n} adults and {k} children pay together?", "a * n + c * k",
      {"a": (6, 12), "c": (2, 5), "n": (2, 4), "k": (2, 5)}),
    # -- sharing
    T("share_equal", "sharing", "{name} has {n} {things} and shares them equally among {k} friends. How many "
      "{things} does each friend get?", "n / k", {"k": (2, 6), "q": (2, 9)}, {"n": "k * q"}),
    T("share_after_eating", "sharing", "{name} has {n} {things}, keeps {e} of them, and shares the rest equally "
      "among {k} friends. How many {things} does each friend get?", "(n - e) / k",
      {"k": (2, 5), "q": (2, 8), "e": (1, 6)}, {"n": "k * q + e"}),
    T("share_bags", "sharing", "{name} packs {n} {things} into bags, with {k} {things} in each bag. How many bags "
      "does {name} fill?", "n / k", {"k": (3, 8), "q": (2, 9)}, {"n": "k * q"}),
    T("share_tables", "sharing", "At a party there are {g} tables with {k} children at each table. How many "
      "children are at the party?", "g * k", {"g": (3, 9), "k": (3, 8)}),
    T("share_pooled", "sharing", "{name} has {a} {things} and {name2} has {b} {things}. They put them together and "
      "split them equally between the two of them. How many {things} does each of them get?", "(a + b) / 2",
      {"a": (3, 20), "b": (3, 20)}, require="a != b"),
    T("share_boxes_left", "sharing", "{name} has {n} {things} and puts {k} in each box. {name} fills {f} boxes. "
      "How many {things} are not in a box?", "n - k * f", {"k": (3, 6), "f": (2, 5), "r": (1, 9)},
      {"n": "k * f + r"}),
    # -- ages
    T("age_older", "ages", "{name} is {x} years old. {name2} is {d} years older than {name}. How old is {name2}?",
      "x + d", {"x": (5, 30), "d": (2, 12)}),
    T("age_future", "ages", "{name} is {x} years old, and {name2} is {d} years older than {name}. How old will "
      "{name2} be in {y} years?", "x + d + y", {"x": (4, 20), "d": (2, 9), "y": (2, 10)}),
    T("age_times", "ages", "{name} is {x} years old. {name2} is {k} times as old as {name}. How old is {name2}?",
      "x * k", {"x": (3, 12), "k": (2, 4)}),
    T("age_sum", "ages", "{name} is {x} years old, and {name2} is {d} years younger than {name}. What is the sum "
      "of their ages?", "x + (x - d)", {"x": (8, 30), "d": (2, 7)}),
    T("age_past", "ages", "{name} is {x} years old now. How old was {name} {y} years ago?", "x - y",
      {"x": (9, 40), "y": (2, 8)}),
    T("age_born", "ages", "{name} was born when {name2} was {d} years old. {name} is {x} years old now. How old "
      "will {name2} be in {y} years?", "x + d + y", {"d": (20, 35), "x": (3, 15), "y": (2, 6)}),
    # -- speeds and distances
    T("speed_distance", "speeds", "A car drives at {v} miles per hour for {t} hours. How many miles does the car "
      "travel?", "v * t", {"v": (30, 60, 40, 50), "t": (2, 4)}),
    T("speed_time", "speeds", "A train travels {d} kilometers at {v} kilometers per hour. How many hours does "
      "the trip take?", "d / v", {"v": (20, 30, 40, 50, 60), "t": (2, 4)}, {"d": "v * t"}),
    T("speed_bike_walk", "speeds", "{name} rides a bike at {v} kilometers per hour for {t} hours and then walks "
      "{w} more kilometers. How many kilometers does {name} travel in all?", "v * t + w",
      {"v": (8, 15), "t": (2, 3), "w": (2, 6)}),
    T("speed_round_trip", "speeds", "{name} walks {d} kilometers to the park and back home the same way, then "
      "walks {e} more kilometers to a shop. How many kilometers does {name} walk in all?", "d * 2 + e",
      {"d": (2, 9), "e": (2, 6)}),
    T("speed_remaining", "speeds", "A bus has to travel {D} kilometers. It drives at {v} kilometers per hour for "
      "{t} hours. How many kilometers does the bus still have to travel?", "D - v * t",
      {"D": (100, 200, 150, 120, 180), "v": (20, 40), "t": (2, 3)}, require="D > v * t"),
    T("speed_average", "speeds", "{name} runs {a} kilometers on Monday, {b} kilometers on Tuesday and {c} "
      "kilometers on Wednesday. How many kilometers does {name} run per day on average?", "(a + b + c) / 3",
      {"a": (2, 9), "b": (2, 9), "c": (2, 9)}),
    # -- money
    T("money_save", "money", "{name} saves {s} dollars every week. How many dollars does {name} save in {w} "
      "weeks?", "s * w", {"s": (3, 12), "w": (3, 9)}),
    T("money_earn_spend", "money", "{name} earns {e} dollars on Monday and {f} dollars on Tuesday, then spends "
      "{g} dollars. How many dollars does {name} have left?", "e + f - g",
      {"e": (5, 30), "f": (5, 30), "g": (3, 25)}, require="g < e + f"),
    T("money_goal", "money", "{name} wants a {thing} that costs {c} dollars. {name} has {h} dollars and saves {s} "
      "dollars a week. How many weeks will it take {name} to have enough?", "(c - h) / s",
      {"h": (2, 20), "s": (2, 6), "w": (2, 8)}, {"c": "h + s * w"}, kind="goods"),
    T("money_allowance", "money", "{name} gets {a} dollars a week for {w} weeks, spends {b} dollars on a {thing}, "
      "and then gets {g} dollars as a gift. How many dollars does {name} have now?", "a * w - b + g",
      {"a": (3, 8), "w": (3, 6), "b": (4, 15), "g": (2, 10)}, require="b < a * w", kind="goods"),
    T("money_split_bill", "money", "A group of {k} friends has lunch. The bill is {B} dollars and they leave a {t}-dollar "
      "tip. They split the total equally. How many dollars does each friend pay?", "(B + t) / k",
      {"k": (2, 5), "q": (6, 15), "t": (2, 6)}, {"B": "k * q - t"}),
    T("money_coins", "money", "{name} has {q} coins worth 5 cents each and {d} coins worth 10 cents each. How many "
      "cents does {name} have?", "q * 5 + d * 10", {"q": (2, 9), "d": (2, 9)}),
    # -- time
    T("time_daily", "time", "{name} reads for {m} minutes every day. How many minutes does {name} read in {d} "
      "days?", "m * d", {"m": (10, 30, 15, 20, 25), "d": (2, 7)}),
    T("time_three_tasks", "time", "{name} spends {a} minutes on homework, {b} minutes practicing piano and {c} "
      "minutes reading. How many minutes is that in all?", "a + b + c",
      {"a": (10, 45), "b": (10, 40), "c": (5, 30)}),
    T("time_movie", "time", "A movie is {h} hours and {m} minutes long. How many minutes long is the movie?",
      "h * 60 + m", {"h": (2, 3), "m": (5, 55)}),
    T("time_baking", "time", "It takes {t} minutes to bake one tray of cookies. {name} bakes {n} trays, one after "
      "another, and then lets the last tray cool for {c} minutes. How many minutes does this take in all?",
      "t * n + c", {"t": (10, 20), "n": (2, 4), "c": (5, 15)}),
    T("time_weeks_days", "time", "{name} goes on a trip for {w} weeks and {d} days. How many days long is the "
      "trip?", "w * 7 + d", {"w": (2, 4), "d": (2, 6)}),
    T("time_left", "time", "{name} has {h} minutes before the bus comes. {name} spends {a} minutes eating and {b} "
      "minutes getting dressed. How many minutes are left before the bus comes?", "h - a - b",
      {"h": (30, 60), "a": (5, 20), "b": (5, 15)}, require="a + b < h"),
    # -- counting
    T("count_more", "counting", "{name} has {a} {things} and gets {b} more. How many {things} does {name} have "
      "now?", "a + b", {"a": (2, 30), "b": (2, 20)}),
    T("count_gave", "counting", "{name} had {a} {things} and gave {b} of them to a friend. How many {things} does "
      "{name} have left?", "a - b", {"a": (8, 40), "b": (2, 7)}),
    T("count_compare", "counting", "{name} has {a} {things} and {name2} has {b} {things}. How many more {things} "
      "does {name} have than {name2}?", "a - b", {"a": (10, 40), "b": (2, 9)}),
    T("count_boxes", "counting", "There are {b} boxes with {k} {things} in each box, and {l} more {things} on the "
      "table. How many {things} are there in total?", "b * k + l", {"b": (2, 6), "k": (3, 10), "l": (2, 9)}),
    T("count_garden", "counting", "A garden has {r} rows with {k} plants in each row. {d} of the plants die. How "
      "many plants are still alive?", "r * k - d", {"r": (3, 8), "k": (3, 9), "d": (2, 8)}),
    T("count_changes", "counting", "{name} had {a} {things}, found {b} more, lost {c}, and then bought {e} more. "
      "How many {things} does {name} have now?", "a + b - c + e",
      {"a": (5, 20), "b": (2, 9), "c": (1, 6), "e": (2, 9)}),
)
del T


class _Rejected(Exception):
    """Drawn numbers that break a rule (a negative or fractional step); draw again."""


def evaluate(expression: str, numbers: Mapping[str, int]) -> Fraction | bool:
    """The exact value of an expression over ``numbers`` (``+ - * /``, parentheses,
    comparisons, ``and``). Raises ``_Rejected`` when an intermediate value of an
    arithmetic operation is negative or a division does not come out even."""
    return _eval(ast.parse(expression, mode="eval").body, numbers)


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval(node: ast.AST, numbers: Mapping[str, int]):
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return Fraction(node.value)
    if isinstance(node, ast.Name):
        return Fraction(numbers[node.id])
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        a, b = _eval(node.left, numbers), _eval(node.right, numbers)
        if isinstance(node.op, ast.Div) and (b == 0 or (a / b).denominator != 1):
            raise _Rejected
        out = _ARITHMETIC[type(node.op)](a, b)
        if out < 0:
            raise _Rejected
        return out
    if isinstance(node, ast.Compare):
        left = _eval(node.left, numbers)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, numbers)
            ok = {ast.Lt: left < right, ast.Gt: left > right, ast.LtE: left <= right, ast.GtE: left >= right,
                  ast.Eq: left == right, ast.NotEq: left != right}[type(op)]
            if not ok:
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        return all(_eval(v, numbers) for v in node.values)
    raise ValueError(f"unsupported expression {ast.dump(node)}")


def _pick(rng: random.Random, items: Sequence):
    return items[int(rng.random() * len(items))]


def _draw(rng: random.Random, spec: tuple[int, ...]) -> int:
    if len(spec) == 2:  # an inclusive range
        low, high = spec
        return low + int(rng.random() * (high - low + 1))
    return _pick(rng, spec)  # choices


def _substitute(expression: str, numbers: Mapping[str, int]) -> str:
    """``"(n - e) / k"`` → ``"(30 - 6) / 4"``."""
    tree = ast.parse(expression, mode="eval")

    class Sub(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            return ast.copy_location(ast.Constant(numbers[node.id]), node)

    return ast.unparse(Sub().visit(tree))


def instance(template: Template, rng: random.Random) -> dict:
    """One row of ``template`` with numbers that meet every rule (drawn again until they do)."""
    for _ in range(10_000):
        numbers = {k: _draw(rng, spec) for k, spec in template.draw.items()}
        try:
            for k, expr in template.derive.items():
                numbers[k] = int(evaluate(expr, numbers))
            if template.require is not None and not evaluate(template.require, numbers):
                continue
            answer = evaluate(template.answer, numbers)
        except _Rejected:
            continue
        if not 1 <= answer <= MAX_ANSWER:
            continue
        name = _pick(rng, NAMES)
        name2 = _pick(rng, [n for n in NAMES if n != name])
        things, thing = _pick(rng, GOODS if template.kind == "goods" else THINGS)
        shown = {k: numbers[k] for k in template.shown}
        prompt = template.text.format(name=name, name2=name2, things=things, thing=thing, **shown)
        return {"problem": prompt, "answer": str(int(answer)), "steps": template.steps, "topic": template.topic,
                "template": template.id, "numbers": shown, "expression": _substitute(template.answer, shown)}
    raise RuntimeError(f"template {template.id!r}: no numbers meet its rules")  # pragma: no cover


def build_rows(size: int = SIZE, seed: int = SEED) -> list[dict]:
    """The set's rows, exactly as shipped for the default ``size`` and ``seed``."""
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    order: list[Template] = []
    while len(rows) < size:
        if not order:  # every template once per round, in a fresh shuffled order
            order = list(TEMPLATES)
            for i in range(len(order) - 1, 0, -1):  # Fisher-Yates on random() alone
                j = int(rng.random() * (i + 1))
                order[i], order[j] = order[j], order[i]
        template = order.pop()
        for _ in range(100):
            row = instance(template, rng)
            if row["problem"] not in seen:
                break
        else:  # pragma: no cover - every template has far more than 100 distinct prompts
            raise RuntimeError(f"template {template.id!r} keeps repeating prompts")
        seen.add(row["problem"])
        rows.append({"id": f"word-{VERSION}-{len(rows):03d}", **row})
    return rows


def to_jsonl(rows: Sequence[dict]) -> Iterator[str]:
    for row in rows:
        yield json.dumps(row, ensure_ascii=False)


def data_path() -> Path:
    """The shipped file."""
    return Path(str(resources.files("itscale.tasks") / "data" / FILE_NAME))


def problems() -> list[Problem]:
    """The shipped set as problems (prompt = the bare question; use the bench's loader,
    ``load_problems("word_problems:v1")``, for its prompt templates)."""
    rows = [json.loads(line) for line in data_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Problem(r["id"], r["problem"], r["answer"], {k: v for k, v in r.items()
                                                          if k not in ("id", "problem", "answer")}) for r in rows]


def write(folder: str | Path | None = None) -> Path:
    """(Re)write the shipped file; run by ``python -m itscale.tasks.word_problems``."""
    out = Path(folder) if folder is not None else data_path().parent
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILE_NAME
    path.write_text("\n".join(to_jsonl(build_rows())) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write())

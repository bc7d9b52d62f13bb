"""The learnt allocation policy (``allocation.json``): probe settings, bin edges, and per cost
level the method and budget for each difficulty bin.

Written by ``itscale bench`` (a config with an ``allocation:`` section), read by the
``compute_optimal`` method (``itscale serve --allocation FILE``). The file::

    {"version": 1,
     "probe": {"score": "agreement", "samples": 4, "aggregation": "last"},
     "edges": [0.0, 0.25, 0.5],                  # bin b holds difficulties in (edges[b-1], edges[b]]
     "sample_cost": 41.3,                        # mean tokens of one whole sample (training split)
     "levels": [{"budget": 8, "cap": 330.4,      # cap = budget × sample_cost, mean tokens per problem
                 "choices": [{"method": "probe", "label": "probe", "params": {}, "budget": 0},
                             {"method": "self_consistency", "label": "majority_vote", "params": {}, "budget": 8},
                             ...],               # one per bin, easiest first
                 "train": {"accuracy": 0.71, "cost": 322.0}, "test": {...}}, ...],
     "learnt_with": {...}}                       # the bench settings it was learnt under (information)

A choice's ``method`` is a registered method name, or ``probe``: answer with the probe's own
vote and spend nothing more (:func:`itscale.allocation.difficulty.vote`).

Budget → level: a run at budget B uses the level with the largest ``budget`` ≤ B, that is the
most accurate learnt allocation whose mean cost per problem is at most that of B whole samples
(levels are learnt at caps that grow with the budget, and accuracy grows with the cap).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .bins import bin_of

#: The ``method`` of a choice that answers with the probe's own samples.
PROBE_METHOD = "probe"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Choice(_Frozen):
    """What a bin runs at one level: a method (with its parameters) at a budget, or the probe."""

    method: str = Field(description="a registered method, or 'probe' (the probe's own vote)")
    label: str = Field("", description="the method's label in the bench that learnt it")
    params: dict[str, Any] = Field(default_factory=dict)
    budget: int = Field(ge=0, description="the method's budget (0 for the probe)")

    @model_validator(mode="after")
    def _budget_fits_the_kind(self) -> Choice:
        if self.method == PROBE_METHOD and self.budget != 0:
            raise ValueError(f"the probe's choice spends nothing more: its budget must be 0, got {self.budget}")
        if self.method != PROBE_METHOD and self.budget < 1:
            raise ValueError(f"budget of {self.method!r} must be a positive integer, got {self.budget}")
        return self

    @property
    def is_probe(self) -> bool:
        return self.method == PROBE_METHOD

    @property
    def name(self) -> str:
        """``label@budget`` (or ``probe``), as tables show it."""
        return PROBE_METHOD if self.is_probe else f"{self.label or self.method}@{self.budget}"


class ProbeSettings(_Frozen):
    """How difficulty is estimated (:mod:`itscale.allocation.probe`)."""

    score: Literal["agreement", "prm"] = "agreement"
    samples: int = Field(4, ge=1, description="whole samples per probe (one request with k = samples)")
    aggregation: Literal["last", "min", "prod", "mean", "model"] = Field(
        "last", description="how the 'prm' score reads a sample's step scores")


class Level(_Frozen):
    """One cost level: the choice per bin learnt under the cap of ``budget`` whole samples."""

    budget: int = Field(ge=1, description="the run budget that selects this level (and larger ones, up to the next)")
    cap: float = Field(ge=0, description="the mean cost per problem it was learnt under: budget × sample_cost")
    choices: tuple[Choice, ...] = Field(min_length=1, description="one per bin, easiest first")
    train: dict[str, float] = Field(default_factory=dict, description="accuracy and cost on the training split")
    test: dict[str, float] = Field(default_factory=dict, description="accuracy and cost on the test split")

    @property
    def max_budget(self) -> int:
        """The largest method budget any bin may run at this level."""
        return max(c.budget for c in self.choices)


class AllocationPolicy(_Frozen):
    """A learnt compute-optimal allocation (module docstring)."""

    version: Literal[1] = 1
    probe: ProbeSettings = ProbeSettings()
    edges: tuple[float, ...] = Field(default=(), description="bin edges, increasing; bins = len(edges) + 1")
    sample_cost: float = Field(gt=0, description="mean tokens of one whole sample on the training split")
    levels: tuple[Level, ...] = Field(min_length=1)
    learnt_with: dict[str, Any] = Field(default_factory=dict)

    @field_validator("edges")
    @classmethod
    def _increasing(cls, edges: tuple[float, ...]) -> tuple[float, ...]:
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"edges must be strictly increasing, got {list(edges)}")
        return edges

    @field_validator("levels")
    @classmethod
    def _distinct_budgets(cls, levels: tuple[Level, ...]) -> tuple[Level, ...]:
        budgets = [lv.budget for lv in levels]
        if len(set(budgets)) != len(budgets):
            raise ValueError(f"each level needs its own budget, got {budgets}")
        return tuple(sorted(levels, key=lambda lv: lv.budget))

    @model_validator(mode="after")
    def _one_choice_per_bin(self) -> AllocationPolicy:
        for i, lv in enumerate(self.levels):
            if len(lv.choices) != self.bins:
                raise ValueError(f"levels[{i}].choices: {len(lv.choices)} choices for {self.bins} bins "
                                 f"({len(self.edges)} edges); give one per bin")
        return self

    # -- reading ---------------------------------------------------------------------
    @property
    def bins(self) -> int:
        return len(self.edges) + 1

    @property
    def budgets(self) -> list[int]:
        return [lv.budget for lv in self.levels]

    def bin_of(self, difficulty: float) -> int:
        return bin_of(difficulty, self.edges)

    def level_for(self, budget: int) -> Level | None:
        """The level a run at ``budget`` uses: the largest level budget ≤ ``budget`` (None: below all)."""
        fitting = [lv for lv in self.levels if lv.budget <= budget]
        return fitting[-1] if fitting else None

    def level(self, budget: int) -> Level:
        """The level learnt for exactly ``budget``."""
        for lv in self.levels:
            if lv.budget == budget:
                return lv
        raise ValueError(f"no cost level at budget {budget}; the levels are at budgets "
                         f"{', '.join(map(str, self.budgets))}")

    def methods(self) -> set[str]:
        """The registered methods some bin may run (the probe left out)."""
        return {c.method for lv in self.levels for c in lv.choices if not c.is_probe}


class AllocationError(ValueError):
    """A policy file that cannot be read; the message names the file and the field."""


def load_allocation(path: str | Path) -> AllocationPolicy:
    """Read and validate an ``allocation.json``."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / "allocation.json"
        if not candidate.is_file():
            raise AllocationError(f"{path} is a folder without an allocation.json; give the file an `itscale bench` "
                                  "run with an `allocation:` section wrote")
        path = candidate
    if not path.is_file():
        raise AllocationError(f"allocation policy {path} does not exist; give the allocation.json an `itscale bench` "
                              "run with an `allocation:` section wrote")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AllocationError(f"{path}: not valid JSON: {err}") from None
    return parse_allocation(data, str(path))


def parse_allocation(data: Any, source: str = "allocation") -> AllocationPolicy:
    """An :class:`AllocationPolicy` from parsed JSON; :class:`AllocationError` names the field."""
    try:
        return AllocationPolicy.model_validate(data)
    except ValidationError as err:
        lines = []
        errors = err.errors()
        for e in errors:  # (an error inside an item also fails its container's length: the inner one says why)
            if any(len(o["loc"]) > len(e["loc"]) and o["loc"][:len(e["loc"])] == e["loc"] for o in errors):
                continue
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
            lines.append(f"{source}: {where or '(top level)'}: {e['msg'].removeprefix('Value error, ')}")
        raise AllocationError("; ".join(lines)) from None


def save_allocation(policy: AllocationPolicy, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(policy.model_dump(mode="json"), indent=2) + "\n")
    return path


__all__ = [
    "PROBE_METHOD",
    "AllocationError",
    "AllocationPolicy",
    "Choice",
    "Level",
    "ProbeSettings",
    "load_allocation",
    "parse_allocation",
    "save_allocation",
]

"""Choosing the method and budget of a request: names, aliases, model-name suffixes.

A request names its method in ``itscale.method`` or in the model name after a colon,
``BASE:METHOD`` or ``BASE:METHOD-BUDGET`` (``tiny:pf-16``, ``tiny:bon-8``,
``tiny:greedy``). ``METHOD`` is a registered method name or one of :data:`ALIASES`.
"""

from __future__ import annotations

import re

from ..strategies import STRATEGIES
from .errors import ApiError, invalid

#: Short names for the methods (a full method name always works too).
ALIASES: dict[str, str] = {
    "pf": "particle_filtering",
    "smc": "particle_filtering",
    "tsmc": "twisted_smc",
    "twisted": "twisted_smc",
    "pg": "particle_gibbs",
    "pt": "parallel_tempering",
    "bon": "best_of_n",
    "wbon": "weighted_best_of_n",
    "sc": "self_consistency",
    "majority": "self_consistency",
    "maj": "self_consistency",
    "asc": "adaptive_self_consistency",
    "bsc": "beta_self_consistency",
    "dc": "deepconf",
    "dc_online": "deepconf_online",
    "sc_bon": "self_certainty",
    "beam": "beam_search",
    "uct": "mcts",
    "tree_search": "mcts",
    "astar": "a_star",
    "epf": "entropic_particle_filtering",
    "entropic_pf": "entropic_particle_filtering",
    "er": "early_rejection",
    "ffs": "first_finish",
    "shortest": "first_finish",
    "cob": "compute_optimal",
}

_SUFFIX = re.compile(r"^(?P<method>[A-Za-z][A-Za-z_]*)(?:-(?P<budget>\d+))?$")


def method_names() -> str:
    aliases = ", ".join(f"{a}={m}" for a, m in ALIASES.items() if m in STRATEGIES)
    return f"{', '.join(sorted(STRATEGIES))} (aliases: {aliases})"


def resolve_method(name: str, param: str) -> str:
    """The registered method ``name`` stands for; a 400 naming ``param`` if none."""
    key = name.strip().lower().replace("-", "_")
    method = ALIASES.get(key, key)
    if method not in STRATEGIES:
        raise invalid(f"{param}: unknown method {name!r}; choose one of: {method_names()}", param, "unknown_method")
    return method


def parse_model(model: str, base: str) -> tuple[str | None, int | None]:
    """The (method, budget) a model name's suffix selects (``None`` where it is silent).

    ``base`` is the served model name; any other base is a 404, as on any OpenAI
    server. A base name that itself contains a colon is matched as a whole first."""
    if model == base:
        return None, None
    if not model.startswith(base + ":"):
        raise ApiError(404, f"model: the model {model!r} does not exist; this server serves {base!r} "
                            f"(optionally with a method suffix, e.g. '{base}:pf-16')", "model", "model_not_found")
    suffix = model[len(base) + 1:]
    m = _SUFFIX.match(suffix)
    if not m:
        raise invalid(f"model: cannot read the suffix {suffix!r}; write METHOD or METHOD-BUDGET, "
                      f"e.g. '{base}:pf-16' or '{base}:greedy'", "model", "invalid_model_suffix")
    method = resolve_method(m["method"], "model")
    budget = int(m["budget"]) if m["budget"] is not None else None
    if budget is not None and budget < 1:
        raise invalid(f"model: the budget in {model!r} must be a positive integer", "model")
    return method, budget

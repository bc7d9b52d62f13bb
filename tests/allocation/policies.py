"""Hand-written allocation policies for the tests of compute_optimal and the server."""

from __future__ import annotations

from itscale.allocation import AllocationPolicy, Choice, Level, ProbeSettings

PROBE = Choice(method="probe", label="probe", budget=0)


def choice(method: str, budget: int, **params) -> Choice:
    return Choice(method=method, label=method, params=params, budget=budget)


def three_bins(score: str = "agreement", hard: int = 8) -> AllocationPolicy:
    """Bins d ≤ 0.25 (easy), (0.25, 0.5], > 0.5; levels at budgets 4, 8, 16."""
    return AllocationPolicy(
        probe=ProbeSettings(score=score, samples=4), edges=(0.25, 0.5), sample_cost=40.0,
        levels=(Level(budget=4, cap=160.0, choices=(PROBE, PROBE, PROBE)),
                Level(budget=8, cap=320.0, choices=(PROBE, choice("self_consistency", 4),
                                                    choice("particle_filtering", hard))),
                Level(budget=16, cap=640.0, choices=(choice("self_consistency", 4), choice("best_of_n", 8),
                                                     choice("particle_filtering", 16)))))


def agreement_only() -> AllocationPolicy:
    """A policy that needs no reward model: the agreement probe and majority vote."""
    return AllocationPolicy(
        probe=ProbeSettings(score="agreement", samples=4), edges=(0.25,), sample_cost=40.0,
        levels=(Level(budget=8, cap=320.0, choices=(PROBE, choice("self_consistency", 8))),))

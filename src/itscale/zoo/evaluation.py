"""The model-card numbers of the embedded pair, measured on the shipped held-out sets.

* greedy accuracy of the policy per difficulty level;
* coverage pass@k (unbiased estimator over n samples per problem, temperature 0.8);
* PRM step-level AUROC on the policy's own sampled steps (held-out problems),
  labels from ``arithmetic.step_labels``, and best-of-n by the PRM against a random
  sample of the same n;
* the PRM's slip test: the reference solution against the same solution with one
  line's result slipped (later lines computed on from the slipped value), per slip
  kind of :data:`itscale.zoo.slips.SLIP_KINDS`; a pair counts when the reference
  scores strictly higher, by the last tag's score (what the methods use by default)
  and by the lowest step score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..stats import auroc, pass_at_k, wilson
from ..tasks import arithmetic


@dataclass
class Report:
    greedy: dict = field(default_factory=dict)  # level -> {accuracy, n, ci95, well_formed}
    coverage: dict = field(default_factory=dict)  # level -> {k, n, problems, pass_at_1, pass_at_k, ...}
    prm: dict = field(default_factory=dict)  # level -> {auroc, steps, positives, ...}
    slips: dict = field(default_factory=dict)  # level -> {kind -> {pairs, last, min}, "overall" -> ...}
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"greedy": self.greedy, "coverage": self.coverage, "prm": self.prm, "slips": self.slips,
                "timings": self.timings, "settings": self.settings}

    def lines(self) -> list[str]:
        out = ["policy greedy accuracy (shipped held-out sets):"]
        for level, r in self.greedy.items():
            lo, hi = r["ci95"]
            out.append(f"  {level:<7} {r['accuracy']:6.1%}  [{lo:.1%}, {hi:.1%}]  n={r['n']}"
                       f"  well-formed steps {r['well_formed_steps']:.1%}")
        for level, r in self.coverage.items():
            out.append(f"coverage ({level}, T={r['temperature']}, n={r['n']} samples x {r['problems']} problems):")
            out.append(f"  pass@1 {r['pass_at_1']:6.1%}   pass@8 {r['pass_at_8']:6.1%}   "
                       f"pass@{r['k']} {r['pass_at_k']:6.1%}   majority@{r['n']} {r['majority']:6.1%}")
        for level, r in self.prm.items():
            out.append(f"PRM step AUROC ({level}, policy samples T={r['temperature']}, {r['problems']} problems x "
                       f"{r['samples']}): {r['auroc']:.4f}  ({r['steps']} steps, {r['wrong_steps']} wrong)")
            out.append(f"  PRM best-of-{r['samples']} (last-step score) accuracy {r['best_of_n_last']:6.1%}   "
                       f"(min-step {r['best_of_n_min']:6.1%}, random sample {r['random_sample']:6.1%}; "
                       f"{r['best_of_n_ratio']:.2f}x)")
        for level, kinds in self.slips.items():
            out.append(f"PRM slip test ({level}): reference scored above its one-slip twin (last tag / min step)")
            for kind, r in kinds.items():
                out.append(f"  {kind:<15} {r['last']:6.1%} / {r['min']:6.1%}   ({r['pairs']} pairs)")
        out.append("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items()))
        return out


def load(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def evaluate(policy_dir, prm_dir=None, levels: Sequence[str] = tuple(arithmetic.LEVELS), n_greedy: int = 500,
             coverage_levels: Sequence[str] | None = None, coverage_problems: int = 200, n: int = 64, k: int = 64,
             temperature: float = 0.8, prm_levels: Sequence[str] | None = None, prm_problems: int = 200,
             prm_samples: int = 8, slip_levels: Sequence[str] | None = None, slip_problems: int = 500,
             seed: int = 0, batch_size: int = 256, threads: int = 2, log=print) -> Report:
    import torch
    from collections import Counter

    from . import DEFAULT_LEVEL
    from .sampling import prm_scores, solve, split_steps

    coverage_levels = [DEFAULT_LEVEL] if coverage_levels is None else list(coverage_levels)
    prm_levels = list(arithmetic.LEVELS) if prm_levels is None else list(prm_levels)
    slip_levels = list(arithmetic.LEVELS) if slip_levels is None else list(slip_levels)
    torch.set_num_threads(threads)
    rep = Report(settings=dict(levels=list(levels), n_greedy=n_greedy, coverage_levels=list(coverage_levels),
                               coverage_problems=coverage_problems, n=n, k=k, temperature=temperature,
                               prm_levels=list(prm_levels), prm_problems=prm_problems, prm_samples=prm_samples,
                               slip_levels=list(slip_levels), slip_problems=slip_problems, seed=seed))
    tok, policy = load(policy_dir)
    t0 = time.time()
    for level in levels:
        probs = arithmetic.eval_set(level)[:n_greedy]
        comps = solve(policy, tok, probs, n=1, temperature=0.0, batch_size=batch_size)
        correct = [arithmetic.is_correct(p, c[0].text) for p, c in zip(probs, comps)]
        steps = [s for c in comps for s in split_steps(c[0].text)]
        acc = float(np.mean(correct))
        rep.greedy[level] = {"accuracy": acc, "n": len(probs), "ci95": list(wilson(acc, len(probs))),
                             "well_formed_steps": float(np.mean([arithmetic.is_well_formed_step(s) for s in steps])),
                             "eos": float(np.mean([c[0].eos for c in comps]))}
        log(f"greedy {level}: {acc:.1%}")
    rep.timings["greedy"] = time.time() - t0
    t0 = time.time()
    for level in coverage_levels:
        probs = arithmetic.eval_set(level)[:coverage_problems]
        comps = solve(policy, tok, probs, n=n, temperature=temperature, batch_size=batch_size, seed=seed)
        counts = [sum(arithmetic.is_correct(p, c.text) for c in cs) for p, cs in zip(probs, comps)]
        majority = []
        for p, cs in zip(probs, comps):
            votes = Counter(a for a in (arithmetic.extract_answer(c.text) for c in cs) if a is not None)
            majority.append(bool(votes) and int(votes.most_common(1)[0][0]) == int(p.answer))
        rep.coverage[level] = {
            "temperature": temperature, "n": n, "k": k, "problems": len(probs),
            "pass_at_1": float(np.mean([pass_at_k(n, c, 1) for c in counts])),
            "pass_at_8": float(np.mean([pass_at_k(n, c, min(8, n)) for c in counts])),
            "pass_at_k": float(np.mean([pass_at_k(n, c, k) for c in counts])),
            "majority": float(np.mean(majority)),
        }
        log(f"coverage {level}: pass@{k} {rep.coverage[level]['pass_at_k']:.1%}")
    rep.timings["coverage"] = time.time() - t0
    if prm_dir is not None:
        t0 = time.time()
        ptok, prm = load(prm_dir)
        rng = np.random.default_rng(seed)
        for level in prm_levels:
            probs = arithmetic.eval_set(level)[:prm_problems]
            comps = solve(policy, tok, probs, n=prm_samples, temperature=temperature, batch_size=batch_size,
                          seed=seed + 1)
            items, owners = [], []
            for pi, (p, cs) in enumerate(zip(probs, comps)):
                for c in cs:
                    steps = split_steps(c.text)
                    if steps:
                        items.append((p, steps))
                        owners.append((pi, c.text))
            scores = prm_scores(prm, ptok, items, batch_size=batch_size)
            labels = [arithmetic.step_labels(p, s) for p, s in items]
            flat_l = [x for ls in labels for x in ls]
            flat_s = [x for ss in scores for x in ss]
            best_min, best_last, rand = {}, {}, {}
            for (pi, text), ss in zip(owners, scores):
                for table, value in ((best_min, min(ss)), (best_last, ss[-1])):
                    if pi not in table or value > table[pi][0]:
                        table[pi] = (value, text)
            for pi, cs in enumerate(comps):
                rand[pi] = (0.0, cs[int(rng.integers(len(cs)))].text)

            def acc_of(table):
                return float(np.mean([arithmetic.is_correct(probs[pi], table[pi][1]) if pi in table else False
                                      for pi in range(len(probs))]))

            rep.prm[level] = {"auroc": auroc(flat_l, flat_s), "temperature": temperature, "problems": len(probs),
                              "samples": prm_samples, "steps": len(flat_l), "wrong_steps": len(flat_l) - sum(flat_l),
                              "best_of_n_min": acc_of(best_min), "best_of_n_last": acc_of(best_last),
                              "random_sample": acc_of(rand),
                              "best_of_n_ratio": acc_of(best_last) / max(acc_of(rand), 1e-9)}
            log(f"PRM {level}: AUROC {rep.prm[level]['auroc']:.4f}")
        rep.timings["prm"] = time.time() - t0
        t0 = time.time()
        for level in slip_levels:
            rep.slips[level] = slip_test(prm, ptok, arithmetic.eval_set(level)[:slip_problems],
                                         seed=seed, batch_size=batch_size)
            log(f"slip test {level}: {rep.slips[level]['overall']['last']:.1%}")
        rep.timings["slips"] = time.time() - t0
    return rep


def slip_test(prm, tokenizer, problems, seed: int = 0, batch_size: int = 256) -> dict:
    """Per slip kind: how often the reference solution scores strictly above the same
    solution with one line's result slipped (line drawn uniformly among those the kind
    applies to; later lines computed on from the slipped value), by the last tag's score
    and by the lowest step score. ``overall`` pools every kind's pairs."""
    from .sampling import prm_scores, split_steps
    from .slips import SLIP_KINDS, slipped_solution

    out, pooled = {}, {"last": [], "min": []}
    for i, kind in enumerate(SLIP_KINDS):
        rng = np.random.default_rng([seed, i])
        pairs = [(p, split_steps(arithmetic.solution_text(p)), s[0]) for p in problems
                 if (s := slipped_solution(p, kind, rng)) is not None]
        scores = prm_scores(prm, tokenizer, [(p, r) for p, r, _ in pairs] + [(p, s) for p, _, s in pairs],
                            batch_size=batch_size)
        n = len(pairs)
        wins = {"last": [scores[j][-1] > scores[n + j][-1] for j in range(n)],
                "min": [min(scores[j]) > min(scores[n + j]) for j in range(n)]}
        out[kind] = {"pairs": n, **{k: float(np.mean(v)) if n else float("nan") for k, v in wins.items()}}
        for k, v in wins.items():
            pooled[k] += v
    out["overall"] = {"pairs": len(pooled["last"]), **{k: float(np.mean(v)) for k, v in pooled.items()}}
    return out

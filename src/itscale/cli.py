"""The ``itscale`` command line: ``itscale demo | bench | serve | solve | zoo ...``
(also ``python -m itscale``; ``itscale --version``).

Each command group registers itself with one ``add_*_parser`` function and runs
through the ``func`` it sets, so new groups plug in
without touching the others. Heavy imports (torch, transformers) happen inside
the command functions only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence


# --------------------------------------------------------------------------- zoo


def _zoo_train_policy(ns: argparse.Namespace) -> int:
    from . import zoo
    from .zoo.training import PolicyArgs, TrainingSetupError, train_policy

    args = PolicyArgs(seed=ns.seed, steps=ns.steps, batch_size=ns.batch_size, lr=ns.lr,
                      warmup_steps=ns.warmup_steps, min_ops=ns.min_ops, max_ops=ns.max_ops,
                      bf16_autocast=not ns.fp32, threads=ns.threads, device=ns.device,
                      checkpoint_every=ns.checkpoint_every, stop_at=ns.stop_at)
    if ns.hidden_size:
        args.arch.hidden_size = ns.hidden_size
    if ns.layers:
        args.arch.num_hidden_layers = ns.layers
    out = Path(ns.out) if ns.out else zoo.policy_path()
    try:
        train_policy(out, args, checkpoint_dir=Path(ns.checkpoint_dir), resume=ns.resume)
    except TrainingSetupError as err:  # device, checkpoint and settings problems, each naming the fix
        print(f"itscale zoo train-policy: {err}", file=sys.stderr)
        return 2
    return 0


def _zoo_train_prm(ns: argparse.Namespace) -> int:
    from . import zoo
    from .zoo.training import PRMArgs, TrainingSetupError, train_prm

    args = PRMArgs(seed=ns.seed, n_problems=ns.problems, samples_per_problem=ns.samples,
                   temperature=ns.temperature, policy_fraction=ns.policy_fraction, p_clean=ns.p_clean,
                   p_line=ns.p_line, local_weight=ns.local_weight, digit_weight=ns.digit_weight,
                   lm_weight=ns.lm_weight, steps=ns.steps, batch_size=ns.batch_size, lr=ns.lr,
                   warmup_steps=ns.warmup_steps, init_from_policy=not ns.from_scratch, bf16_autocast=not ns.fp32,
                   threads=ns.threads, device=ns.device, checkpoint_every=ns.checkpoint_every,
                   val_problems=ns.val_problems, stop_at=ns.stop_at)
    policy = Path(ns.policy) if ns.policy else zoo.policy_path()
    out = Path(ns.out) if ns.out else zoo.prm_path()
    try:
        train_prm(policy, out, args, init_dir=Path(ns.init) if ns.init else None,
                  checkpoint_dir=Path(ns.checkpoint_dir), resume=ns.resume)
    except TrainingSetupError as err:  # device, checkpoint and settings problems, each naming the fix
        print(f"itscale zoo train-prm: {err}", file=sys.stderr)
        return 2
    return 0


def _zoo_evaluate(ns: argparse.Namespace) -> int:
    from . import zoo
    from .zoo.evaluation import evaluate

    policy = Path(ns.policy) if ns.policy else zoo.policy_path()
    prm = None if ns.no_prm else (Path(ns.prm) if ns.prm else zoo.prm_path())
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if ns.verbose else (lambda m: None)
    rep = evaluate(policy, prm, levels=ns.levels, n_greedy=ns.greedy_problems,
                   coverage_levels=ns.coverage_levels, coverage_problems=ns.coverage_problems, n=ns.n, k=ns.k,
                   temperature=ns.temperature, prm_levels=ns.prm_levels, prm_problems=ns.prm_problems,
                   prm_samples=ns.prm_samples, slip_levels=ns.slip_levels, slip_problems=ns.slip_problems,
                   seed=ns.seed, batch_size=ns.batch_size, threads=ns.threads, log=log)
    print("\n".join(rep.lines()))
    if ns.json:
        Path(ns.json).write_text(json.dumps(rep.as_dict(), indent=2) + "\n")
    return 0


def add_zoo_parser(sub: argparse._SubParsersAction) -> None:
    from .tasks.arithmetic import LEVELS
    from .zoo import DEFAULT_LEVEL
    from .zoo.recipes import PRMArgs

    zoo = sub.add_parser("zoo", help="train and evaluate the embedded model pair")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="{train-policy,train-prm,evaluate}")

    def training_options(p: argparse.ArgumentParser, name: str, checkpoint_every: int) -> None:
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
        p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
        p.add_argument("--threads", type=int, default=2, help="CPU threads")
        p.add_argument("--checkpoint-dir", default=f"itscale-zoo-checkpoints/{name}",
                       help="where the resumable state goes (default: %(default)s)")
        p.add_argument("--checkpoint-every", type=int, default=checkpoint_every, help="steps between checkpoints")
        p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                       help="end the run after STEP (saving the model); the learning-rate schedule still "
                            "spans --steps, so a later --resume without it continues the same run")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --checkpoint-dir (same settings) instead of starting over")

    p = zsub.add_parser("train-policy", help="train the embedded policy (2 CPU cores: ~17 min)")
    p.add_argument("--out", help="output folder (default: the shipped policy folder)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=750)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--min-ops", type=int, default=2)
    p.add_argument("--max-ops", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=0, help="override the architecture's hidden size")
    p.add_argument("--layers", type=int, default=0, help="override the number of layers")
    training_options(p, "policy", 50)
    p.set_defaults(func=_zoo_train_policy)

    d = PRMArgs()
    p = zsub.add_parser("train-prm", help="sample the policy and train the embedded PRM to verify each line")
    p.add_argument("--policy", help="policy folder to sample (default: the shipped policy)")
    p.add_argument("--out", help="output folder (default: the shipped PRM folder)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--problems", type=int, default=d.n_problems, help="problems whose policy samples are mixed in")
    p.add_argument("--samples", type=int, default=d.samples_per_problem, help="sampled solutions per problem")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--policy-fraction", type=float, default=d.policy_fraction,
                   help="share of each batch from the policy's samples; the rest are synthetic near misses")
    p.add_argument("--p-clean", type=float, default=d.p_clean, help="share of synthetic solutions with no slip")
    p.add_argument("--p-line", type=float, default=d.p_line,
                   help="in the others: each line past the first slipped one slips with this probability")
    p.add_argument("--local-weight", type=float, default=d.local_weight, help="weight of the local-label loss")
    p.add_argument("--digit-weight", type=float, default=d.digit_weight,
                   help="weight of the loss on each result character's label")
    p.add_argument("--lm-weight", type=float, default=d.lm_weight, help="weight of the next-digit loss on results")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--val-problems", type=int, default=d.val_problems,
                   help="fresh problems for the validation numbers logged at each checkpoint")
    p.add_argument("--from-scratch", action="store_true", help="do not start from the policy's weights")
    p.add_argument("--init", help="start from this checkpoint's weights instead of the sampled policy's")
    training_options(p, "prm", d.checkpoint_every)
    p.set_defaults(func=_zoo_train_prm)

    p = zsub.add_parser("evaluate", help="print the model-card numbers")
    p.add_argument("--policy", help="policy folder (default: shipped)")
    p.add_argument("--prm", help="PRM folder (default: shipped)")
    p.add_argument("--no-prm", action="store_true")
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    p.add_argument("--greedy-problems", type=int, default=500)
    p.add_argument("--coverage-levels", nargs="*", default=[DEFAULT_LEVEL], choices=list(LEVELS))
    p.add_argument("--coverage-problems", type=int, default=200)
    p.add_argument("-n", type=int, default=64, help="samples per problem for pass@k")
    p.add_argument("-k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--prm-levels", nargs="*", default=list(LEVELS), choices=list(LEVELS))
    p.add_argument("--prm-problems", type=int, default=200)
    p.add_argument("--prm-samples", type=int, default=8)
    p.add_argument("--slip-levels", nargs="*", default=list(LEVELS), choices=list(LEVELS),
                   help="levels of the PRM's slip test")
    p.add_argument("--slip-problems", type=int, default=500, help="held-out problems per level in the slip test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    p.set_defaults(func=_zoo_evaluate)


# --------------------------------------------------------------------------- bench and demo

BENCH_HELP = """\
Sweep methods x budgets x seeds over a problem set and report accuracy versus compute.

The config file (YAML or TOML) names the problem set, the models, the methods and the
budgets; every setting has a default except `methods`. A minimal config:

    methods:
      - name: self_consistency
      - name: best_of_n
      - name: particle_filtering
    budgets: [1, 2, 4, 8, 16]

All settings (defaults in brackets):

    problems:  source [arithmetic:medium] (or word_problems:v1, or a .jsonl/.parquet file with problem, answer,
               id, level; GSM8K's question/answer "... #### N" and MATH's problem/solution "\\boxed{N}" as they are),
               template [files: plain with the embedded policy, else boxed]
               (plain | boxed | steps | a string with {problem}), limit, on_bad_row [fail] (fail | skip)
    policy:    model [embedded] (or a Hugging Face folder, a .gguf file, or http(s):// OpenAI-compatible
               URLs), device [auto] (auto | cpu | cuda | cuda:N | mps), dtype [auto] (auto | float32 |
               bfloat16 | float16), temperature [0.8], top_p [1.0], max_step_tokens [48], threads,
               max_batch [256], tokenizer, served_model; for URLs: api_key_env, timeout [60],
               retries [4], max_concurrency [64], merge_prompts [256], kv_block
    prm:       model [embedded] (the same, none, or module:function for a verifier), kind [tag]
               (tag | classifier | verifier | judge | confidence), device, dtype, max_batch [128],
               step_tag, good_token [+; judge: Yes], bad_token [-; judge: No], positive_label [1],
               template (judge), measure [self-certainty] (confidence: self-certainty | mean-logprob),
               tokenizer, served_model and the URL settings
    format:    arithmetic | math | {delimiter, answer_markers, max_steps}   [arithmetic]
    methods:   a list of {name, label, params, budgets}; `itscale bench --methods` lists them
    budgets [1,2,4,8,16], seeds [0], concurrency [128], subsets [64], output [itscale-bench]
    allocation: (optional) learn a compute-optimal allocation after the sweep: probe [agreement] (agreement |
               prm), probe_samples [4], aggregation [last] (prm probe), bins [5], train_fraction [0.5],
               budgets [the sweep's] (cost levels, in whole samples per problem), answer_from_probe [true];
               writes allocation.json for `itscale serve --allocation` and a table of the learnt allocation
               against the best uniform method on the held-out problems
    ray:       (optional; or --ray [ADDRESS]) run the work units on a Ray cluster: address [RAY_ADDRESS, else
               a cluster started here] (HOST:PORT of the head | ray://HOST:PORT | auto), workers [CPUs / num_cpus],
               num_cpus [1], num_gpus [0] (per worker), chunk [16] (problems per unit), retries [3] (per unit
               whose worker died); this process alone writes the store, so a rerun resumes as on one machine

Results go to a SQLite store in the output folder; rerunning the same command skips
finished work (a killed run resumes), then writes records/metrics CSV and JSONL, two
PNG plots and report.html. Command-line options override the file.
"""


def _bench_overrides(ns: argparse.Namespace) -> dict:
    over: dict = {}
    if ns.output:
        over["output"] = ns.output
    if ns.limit is not None:  # 0 and negatives go to the config's validation, which names the field
        over.setdefault("problems", {})["limit"] = ns.limit
    if ns.problems:
        over.setdefault("problems", {})["source"] = ns.problems
    if ns.budgets:
        over["budgets"] = ns.budgets
    if ns.seeds:
        over["seeds"] = ns.seeds
    if ns.concurrency is not None:
        over["concurrency"] = ns.concurrency
    if ns.policy:
        over.setdefault("policy", {})["model"] = ns.policy
    if ns.prm:
        over.setdefault("prm", {})["model"] = ns.prm
    if ns.ray is not None:
        over["ray"] = {"address": ns.ray} if ns.ray else {}
    for setting in ("device", "dtype"):  # for both models
        if getattr(ns, setting):
            for role in ("policy", "prm"):
                over.setdefault(role, {})[setting] = getattr(ns, setting)
    return over


def _bench(ns: argparse.Namespace) -> int:
    from .strategies import STRATEGIES

    if ns.methods:
        for name, cls in sorted(STRATEGIES.items()):
            fields = ", ".join(f"{k}=(required)" if v.is_required() else f"{k}={v.default!r}"
                               for k, v in cls.Params.model_fields.items())
            print(f"{name:28s} {fields or '(no parameters)'}")
        return 0
    if not ns.config:
        print("itscale bench: give a config file (see `itscale bench --help`)", file=sys.stderr)
        return 2
    from .bench.config import ConfigError, load_config

    try:
        config = load_config(ns.config, _bench_overrides(ns))
    except ConfigError as err:
        print(f"itscale bench: invalid configuration\n{err}", file=sys.stderr)
        return 2
    return _run_bench(config, "itscale bench")


def _run_bench(config, title: str) -> int:
    from .bench.problems import ProblemSetError
    from .bench.run import run_bench

    from .bench.ray_sweep import RayClusterError

    try:
        outcome = run_bench(config, title=title)
    except (ProblemSetError, ValueError, FileNotFoundError, RayClusterError) as err:
        print(f"itscale: {err}", file=sys.stderr)
        return 2
    if outcome.results and outcome.errors == outcome.results:  # nothing but errors: the run did not work
        print("itscale: every result is an error (see above); nothing was measured", file=sys.stderr)
        return 1
    return 0


def _demo(ns: argparse.Namespace) -> int:
    from .bench.config import ConfigError
    from .bench.demo import demo_config

    try:
        config = demo_config(output=ns.output, problems=ns.problems, policy=ns.policy, prm=ns.prm)
    except ConfigError as err:
        print(f"itscale demo: invalid options (--problems sets problems.limit, --output sets output)\n{err}",
              file=sys.stderr)
        return 2
    return _run_bench(config, "itscale demo")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="sweep methods x budgets over a problem set; plots and an HTML report",
                       description=BENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML or TOML config file")
    p.add_argument("--methods", action="store_true", help="list the methods and their parameters, then exit")
    p.add_argument("--output", help="output folder (overrides `output`)")
    p.add_argument("--problems", help="problem set (overrides `problems.source`)")
    p.add_argument("--limit", type=int, help="use the first N problems")
    p.add_argument("--budgets", type=int, nargs="+", help="overrides `budgets`")
    p.add_argument("--seeds", type=int, nargs="+", help="overrides `seeds`")
    p.add_argument("--concurrency", type=int, help="problems in flight at once")
    p.add_argument("--policy", help="policy folder or http(s):// URL (overrides `policy.model`)")
    p.add_argument("--prm", help="PRM folder, http(s):// URL, or 'none' (overrides `prm.model`)")
    p.add_argument("--device", help="where local models run: auto, cpu, cuda, cuda:N, mps (overrides "
                                    "`policy.device` and `prm.device`)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="local models' dtype (overrides `policy.dtype` and `prm.dtype`)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the work units on a Ray cluster: ADDRESS of its head (HOST:PORT from `ray start "
                        "--head`, or 'auto'); without one, RAY_ADDRESS or a cluster started here (overrides "
                        "`ray.address`; needs pip install 'itscale[ray]')")
    p.set_defaults(func=_bench)

    p = sub.add_parser("demo", help="the embedded demo: 11 methods x budgets 1-16 on 100 held-out problems",
                       description="Greedy, majority vote, best-of-N, weighted best-of-N, beam search, DVTS, "
                                   "particle filtering, entropic particle filtering, early rejection, A* and MCTS "
                                   "on held-out arithmetic problems with the embedded policy and PRM; prints the "
                                   "table and writes plots and an HTML report.")
    p.add_argument("--output", default="itscale-demo", help="output folder [itscale-demo]")
    p.add_argument("--problems", type=int, default=100, help="held-out problems [100]")
    p.add_argument("--policy", default="embedded",
                   help="policy: 'embedded', a folder, or an OpenAI-compatible URL serving the embedded policy")
    p.add_argument("--prm", default="embedded", help="PRM: 'embedded', a folder, or a URL serving the embedded PRM")
    p.set_defaults(func=_demo)


# --------------------------------------------------------------------------- models (serve, solve)


def add_model_options(g: argparse._ActionsContainer) -> None:
    """The options that name and place the policy and the PRM, shared by ``itscale serve`` and
    ``itscale solve``; :func:`model_settings` turns them into ``ServeConfig`` fields."""
    g.add_argument("--policy", default="embedded", help="'embedded', a Hugging Face folder, a .gguf file, or "
                                                         "http(s):// OpenAI-compatible URL(s), comma-separated "
                                                         "[embedded]")
    g.add_argument("--prm", default="embedded", help="'embedded', a folder, a URL, or 'none' [embedded]")
    from typing import get_args

    from .backends.spec import Measure, PRMKind

    g.add_argument("--prm-kind", default="tag", choices=list(get_args(PRMKind)),
                   help="how the PRM scores steps: tag, classifier, verifier (--prm is a Python function "
                        "module.path:function scoring the latest step), judge (--prm is any chat model asked "
                        "whether each step is correct) or confidence (--prm is the policy's model: its own "
                        "self-certainty) [tag]")
    g.add_argument("--prm-template", help="judge: the question about a step, a file or a template with {question}, "
                                          "{previous_steps} and {step}")
    g.add_argument("--prm-good-token", help="tag PRM: the token meaning 'right' [+]; judge: the yes word [Yes]")
    g.add_argument("--prm-bad-token", help="tag PRM: the token meaning 'wrong' [-]; judge: the no word [No]")
    g.add_argument("--prm-measure", choices=list(get_args(Measure)),
                   help="confidence: self-certainty or mean token log-probability [self-certainty]")
    g.add_argument("--policy-served-model", help="model name on the policy URL (default: the only one)")
    g.add_argument("--prm-served-model", help="model name on the PRM URL (default: the only one)")
    g.add_argument("--policy-tokenizer", help="local tokenizer folder for a policy URL")
    g.add_argument("--prm-tokenizer", help="local tokenizer folder for a PRM URL")
    g.add_argument("--prm-step-tag", help="the PRM's one-token mark after each step: a tag PRM's tag [§; "
                                          "Math-Shepherd: ки], a classifier's separator [<extra_0>]")
    g.add_argument("--format", choices=["arithmetic", "math"],
                   help="step format (default: arithmetic for the embedded policy, math otherwise)")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--max-batch", type=int, default=256, help="rows the local policy decodes together [256]")
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    g.add_argument("--device", default="auto", help="where local models run: auto (CUDA when present), cpu, cuda, "
                                                     "cuda:N, mps [auto]")
    g.add_argument("--dtype", default="auto", choices=dtypes,
                   help="local models' dtype (auto: float32, or the checkpoint's 16-bit dtype on a GPU) [auto]")
    for role in ("policy", "prm"):
        g.add_argument(f"--{role}-device", help=f"the {role.upper() if role == 'prm' else role}'s device "
                                                "(default: --device)")
        g.add_argument(f"--{role}-dtype", choices=dtypes, help="its dtype (default: --dtype)")


def model_settings(ns: argparse.Namespace) -> dict:
    """The :class:`~itscale.serve.config.ServeConfig` fields of :func:`add_model_options`."""
    fields = ("policy", "prm", "prm_kind", "prm_template", "prm_measure", "prm_good_token", "prm_bad_token",
              "policy_served_model", "prm_served_model", "policy_tokenizer",
              "prm_tokenizer", "prm_step_tag", "format", "threads", "max_batch", "device", "dtype", "policy_device",
              "policy_dtype", "prm_device", "prm_dtype")
    return {f: getattr(ns, f) for f in fields}


def option_errors(err, renames: dict[str, str] | None = None) -> list[str]:
    """A ``ServeConfig`` validation error as lines naming the command-line options
    (``--prm-kind: ...``); ``renames`` maps a field to its option where the names differ."""
    from .serve.errors import field_path

    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["loc"]:
            msg = f"{field_path(e['loc']).removeprefix('limits.')}: {msg}"
        flag = msg.split(":", 1)[0]  # the field, written as its option
        option = (renames or {}).get(flag, flag)
        lines.append(f"--{option.replace('_', '-')}{msg[len(flag):]}")
    return lines


# --------------------------------------------------------------------------- serve

SERVE_HELP = """\
Serve an OpenAI-compatible API that answers each request with an inference-time
scaling method: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

With no --policy/--prm it serves the embedded model pair as model "tiny". A request
picks its method and budget with a model suffix (model="tiny:pf-16", "tiny:bon-8",
"tiny:greedy") or with extra_body={"itscale": {"method": "particle_filtering",
"budget": 16, "params": {...}}}. Aliases: pf, tsmc, pg, pt, bon, wbon, sc/majority,
asc, beam, dvts, greedy.

With --allocation FILE (the allocation.json of an `itscale bench` run with an
`allocation:` section) the method compute_optimal (alias cob) probes each request's
difficulty and runs the method and budget learnt for it; the request's budget B picks
the learnt cost level with the largest budget <= B (a mean cost per problem of at most
B whole samples), and itscale.params.level names a level directly.

Keys: --api-key-file FILE has one key per line, optionally followed by its limits
(name=alice max_budget=64 max_tokens=1024 max_running=4); ITSCALE_API_KEYS holds
comma-separated keys with the server's limits. Without keys the server is open and
may listen on loopback only (unless --allow-open).
"""


def _serve(ns: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .serve.auth import KeyFileError
    from .serve.config import Limits, ServeConfig
    from .serve.methods import ALIASES
    from .serve.server import StartupError, configure_logging, key_ring, serve

    configure_logging(ns.log_level)
    default_method = ns.default_method or ("self_consistency" if ns.prm.lower() == "none" else "particle_filtering")
    try:
        limits = Limits(max_budget=ns.max_budget, max_tokens=ns.max_tokens)
        config = ServeConfig(
            **model_settings(ns), served_model_name=ns.served_model_name, temperature=ns.temperature,
            top_p=ns.top_p, step_tokens=ns.step_tokens, default_method=ALIASES.get(default_method, default_method),
            default_budget=ns.default_budget, allocation=ns.allocation,
            limits=limits, host=ns.host, port=ns.port, allow_open=ns.allow_open, max_running=ns.max_running,
            max_queue=ns.max_queue, request_timeout=ns.request_timeout, graceful_timeout=ns.graceful_timeout,
            header_timeout=ns.header_timeout, body_timeout=ns.body_timeout,
            progress_interval=ns.progress_interval, cache_isolation=ns.cache_isolation, replica_id=ns.replica_id)
        keys = key_ring(config, ns.api_key or (), ns.api_key_file)
    except ValidationError as err:
        for line in option_errors(err):
            print(f"itscale serve: {line}", file=sys.stderr)
        return 2
    except (KeyFileError, StartupError) as err:
        print(f"itscale serve: {err}", file=sys.stderr)
        return 2
    try:
        serve(config, keys, log_level=ns.log_level, access_log=not ns.no_access_log)
    except (ValueError, FileNotFoundError) as err:  # a model that cannot be loaded or reached
        print(f"itscale serve: {err}", file=sys.stderr)
        return 2
    return 0


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server applying a scaling method per request",
                       description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models")
    add_model_options(g)
    g.add_argument("--served-model-name", help="model name clients use (default: 'tiny' for the embedded policy)")
    g = p.add_argument_group("methods and limits")
    g.add_argument("--default-method",
                   help="method when a request names none [particle_filtering; self_consistency with --prm none]")
    g.add_argument("--default-budget", type=int, default=8, help="budget when a request names none [8]")
    g.add_argument("--allocation", metavar="FILE",
                   help="a learnt compute-optimal allocation (the allocation.json of `itscale bench` with an "
                        "`allocation:` section): enables the method compute_optimal (alias cob)")
    g.add_argument("--max-budget", type=int, default=64, help="largest budget per request (keys may override) [64]")
    g.add_argument("--max-tokens", type=int, default=512,
                   help="largest max_tokens per candidate solution, and the default (keys may override) [512]")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when a request sets none")
    g.add_argument("--top-p", type=float, default=1.0, help="top-p when a request sets none [1.0]")
    g.add_argument("--step-tokens", type=int, default=48, help="token limit of one step [48]")
    g = p.add_argument_group("network, keys and load")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    g.add_argument("--port", type=int, default=8000, help="port [8000]")
    g.add_argument("--api-key", action="append", metavar="KEY",
                   help="accept this key (repeatable; visible in ps: prefer --api-key-file or ITSCALE_API_KEYS)")
    g.add_argument("--api-key-file", metavar="FILE", help="keys, one per line, with optional limits")
    g.add_argument("--allow-open", action="store_true", help="allow serving without keys on a non-loopback host")
    g.add_argument("--max-running", type=int, default=32, help="requests running at once [32]")
    g.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot; more get 429 [256]")
    g.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds per request, queue included (504 after) [300]")
    g.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get at shutdown [30]")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request headers (closed with 408 after) [10]")
    g.add_argument("--body-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request body (408 after) [10]")
    g.add_argument("--progress-interval", type=float, default=1.0,
                   help="seconds between streamed progress comments [1]")
    g.add_argument("--cache-isolation", default="shared", choices=["shared", "per-key"],
                   help="shared: every request may reuse what the models' caches (KV prefix tree, PRM scores, "
                        "vLLM's prefix cache) hold for any request, faster for repeated prompts; per-key: a request "
                        "never reads cache entries another API key's requests wrote (keys with the same name "
                        "share). Usage never depends on other keys' traffic either way [shared]")
    g.add_argument("--replica-id", metavar="NAME",
                   help="this server's name among replicas behind a load balancer: the replica label of every "
                        "/metrics sample and the x-itscale-replica header of every response (visible ASCII, no "
                        "spaces or quotes) [HOSTNAME:PORT]")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument("--no-access-log", action="store_true", help="no uvicorn line per HTTP request")
    p.set_defaults(func=_serve)


# --------------------------------------------------------------------------- solve

SOLVE_HELP = """\
Answer one question with an inference-time scaling method and show how it got there:
the answer, the chosen solution, and the final candidates with their weights and scores.

    itscale solve "Start at 3. Apply in order: +4, *2, -1."
    itscale solve "QUESTION" --policy path/to/model --prm path/to/prm --method pf --budget 16
    echo "QUESTION" | itscale solve - --json
    itscale solve "QUESTION" --method cob --allocation runs/x/allocation.json --budget 8

The models are named and placed as for `itscale serve` (default: the embedded pair, which
knows only its arithmetic task); methods and aliases as `itscale bench --methods` and the
server name them (pf, tsmc, pg, pt, bon, wbon, sc/majority, asc, beam, dvts, greedy).
--json prints one JSON object on standard output and nothing else.
"""


def _solve(ns: argparse.Namespace) -> int:
    from .cli_solve import run_solve

    return run_solve(ns)


def add_solve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("solve", help="answer one question with a scaling method; candidates, weights and scores",
                       description=SOLVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", metavar="QUESTION", help="the question, or - to read it from standard input")
    g = p.add_argument_group("method")
    g.add_argument("--method", help="method name or alias [particle_filtering; self_consistency with --prm none]")
    g.add_argument("--budget", type=int, default=8, help="samples or particles the method may use [8]")
    g.add_argument("--allocation", metavar="FILE",
                   help="a learnt compute-optimal allocation (allocation.json), for --method compute_optimal")
    g.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a method parameter (repeatable; VALUE read as JSON when it is), e.g. --param beam_width=2")
    g.add_argument("--seed", type=int, help="makes the run reproducible with local models (default: a random "
                                            "seed, shown in the output)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature [0.8]")
    g.add_argument("--top-p", type=float, default=1.0, help="top-p [1.0]")
    g.add_argument("--max-tokens", type=int, default=512, help="token limit of each candidate solution [512]")
    g.add_argument("--step-tokens", type=int, default=48, help="token limit of one step [48]")
    g.add_argument("--json", action="store_true", help="print one JSON object on standard output, nothing else")
    add_model_options(p.add_argument_group("models"))
    p.set_defaults(func=_solve)


# --------------------------------------------------------------------------- entry point

#: One function per command group; a new group appends its own.
PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [add_zoo_parser, add_bench_parser,
                                                                add_serve_parser, add_solve_parser]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="itscale", description="Inference-time scaling for LLMs.")
    parser.add_argument("--version", action="version", version=f"itscale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return int(ns.func(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())

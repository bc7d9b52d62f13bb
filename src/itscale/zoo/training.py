"""Training scripts of the embedded model pair (design 7).

Run through the CLI (never by tests or CI)::

    itscale zoo train-policy            # writes src/itscale/zoo/models/policy
    itscale zoo train-prm               # samples from that policy, writes .../models/prm

Both models are Llama-architecture causal LMs over the character-level tokenizer of
:mod:`itscale.zoo.tokenizer`. The policy learns ``arithmetic.solution_text`` of
freshly generated problems (loss on the assistant turn only). The PRM starts from
the policy's weights and learns, at every step tag ``§``, to predict ``+`` when the
solution is still on track and ``-`` when it is not (Math-Shepherd style: full-vocab
cross-entropy at the tag positions only), on the policy's own sampled solutions
with exact prefix labels from ``arithmetic.step_labels``.

Every setting, data size and wall time is written to ``training_args.json`` next to
the weights.
"""

from __future__ import annotations

import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..rewards.formats import EMBEDDED_TAG_FORMAT
from ..tasks import arithmetic
from ..types import Problem
from .tokenizer import CHAT_TEMPLATE, EOS, MODEL_MAX_LENGTH, build_tokenizer, chat_prompt

IGNORE = -100


@dataclass
class Architecture:
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    intermediate_size: int = 688
    max_position_embeddings: int = MODEL_MAX_LENGTH
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False


@dataclass
class PolicyArgs:
    seed: int = 1234
    steps: int = 750
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    min_ops: int = 2
    max_ops: int = 6
    bf16_autocast: bool = True
    threads: int = 2
    log_every: int = 25
    checkpoint_every: int = 0
    arch: Architecture = field(default_factory=Architecture)


@dataclass
class PRMArgs:
    seed: int = 4321
    n_problems: int = 2000
    samples_per_problem: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 128
    sample_batch_size: int = 256
    dedupe: bool = True
    balance: bool = True  # reweight the tag losses so both classes weigh the same in total
    val_fraction: float = 0.05
    steps: int = 600
    batch_size: int = 64
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    min_ops: int = 2
    max_ops: int = 6
    init_from_policy: bool = True
    bf16_autocast: bool = True
    threads: int = 2
    log_every: int = 25
    checkpoint_every: int = 250  # here: how often to log the validation AUROC
    near_misses: int = 0  # synthetic near-miss solutions added per training problem (see near_miss)


def eval_prompts() -> set[str]:
    """Prompts of every shipped held-out set (never trained on)."""
    return {p.prompt for level in arithmetic.LEVELS for p in arithmetic.eval_set(level)}


def problem_stream(seed: int, difficulty: arithmetic.Difficulty, exclude: set[str],
                   counter: dict | None = None) -> Iterator[Problem]:
    """Endless seeded problems, skipping any whose prompt is in ``exclude``."""
    rng = np.random.default_rng(seed)
    i = 0
    while True:
        p = arithmetic.make_problem(*arithmetic.generate(rng, difficulty), f"train-{seed}-{i}")
        i += 1
        if p.prompt in exclude:
            if counter is not None:
                counter["excluded"] = counter.get("excluded", 0) + 1
            continue
        yield p


def build_model(tokenizer, arch: Architecture, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), **asdict(arch),
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_folder(model, tokenizer, out: Path, training_args: dict) -> None:
    """``save_pretrained`` plus the fields other tooling needs (design 7)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    cfg_path, tok_path = out / "config.json", out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    cfg.setdefault("rope_scaling", None)
    cfg["torch_dtype"] = "float32"
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tcfg = json.loads(tok_path.read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tcfg["chat_template"] = CHAT_TEMPLATE
    tcfg["eos_token"] = EOS
    tcfg.pop("bos_token", None)
    tcfg["add_bos_token"] = False
    tcfg["add_eos_token"] = False
    tok_path.write_text(json.dumps(tcfg, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "training_args.json").write_text(json.dumps(training_args, indent=2) + "\n")


def environment() -> dict:
    import tokenizers
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "platform": platform.platform(), "threads": torch.get_num_threads()}


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio`` (a multiplier of the peak lr)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(model, lr: float, weight_decay: float, betas) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas))


def right_pad(rows: Sequence[Sequence[int]], value: int, multiple: int = 1) -> torch.Tensor:
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    t = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        t[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return t


def _seed_everything(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _describe_path(path) -> str:
    from . import policy_path

    return "itscale.zoo.policy_path()" if Path(path).resolve() == policy_path().resolve() else str(path)


def _sha256(path: Path) -> str | None:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _summary(path: Path) -> dict | None:
    """Another run's training_args.json without its loss history."""
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    d.pop("history", None)
    return d


def _log(fh, msg: str) -> None:
    print(msg, file=fh, flush=True)


# --------------------------------------------------------------------------- policy


def policy_batch(tokenizer, problems: Sequence[Problem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    prompts = tokenizer([chat_prompt(p.prompt) for p in problems], add_special_tokens=False)["input_ids"]
    answers = tokenizer([arithmetic.solution_text(p) + EOS for p in problems], add_special_tokens=False)["input_ids"]
    ids = [a + b for a, b in zip(prompts, answers)]
    labels = [[IGNORE] * len(a) + b for a, b in zip(prompts, answers)]
    input_ids = right_pad(ids, tokenizer.pad_token_id)
    return input_ids, (input_ids != tokenizer.pad_token_id).long(), right_pad(labels, IGNORE)


def train_loop(model, args, next_batch: Callable[[int], tuple], log, checkpoint: Callable[[int], None] | None = None,
               loss_fn: Callable | None = None) -> list[dict]:
    """The shared loop: AdamW, warm-up + cosine, gradient clipping, optional bf16 autocast."""
    opt = make_optimizer(model, args.lr, args.weight_decay, args.betas)
    history, t0, window = [], time.time(), []
    model.train()
    for step in range(args.steps):
        scale = lr_at(step, args.steps, args.warmup_steps, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = args.lr * scale
        input_ids, _mask, labels = next_batch(step)
        # Rows are right-padded and attention is causal, so no real token ever sees a pad:
        # no mask needed (and SDPA's causal fast path is kept).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
            logits = model(input_ids=input_ids).logits
        loss, acc = (loss_fn or causal_lm_loss)(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        window.append((loss.item(), acc))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            row = {"step": step + 1, "loss": float(np.mean([w[0] for w in window])),
                   "token_acc": float(np.mean([w[1] for w in window])), "lr": args.lr * scale,
                   "grad_norm": float(gnorm), "elapsed_s": round(time.time() - t0, 1)}
            history.append(row)
            window = []
            log(json.dumps(row))
        if checkpoint is not None and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            checkpoint(step + 1)
            model.train()
    model.eval()
    return history


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None):
    """Next-token cross-entropy on positions whose label is not IGNORE; also token accuracy."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    keep = shift_labels != IGNORE
    flat_logits, flat_labels = shift_logits[keep], shift_labels[keep]
    ce = torch.nn.functional.cross_entropy(flat_logits, flat_labels, reduction="none")
    if weights is not None:
        w = weights[:, 1:][keep]
        loss = (ce * w).sum() / w.sum()
    else:
        loss = ce.mean()
    acc = (flat_logits.argmax(-1) == flat_labels).float().mean().item()
    return loss, acc


def train_policy(out: Path, args: PolicyArgs, log_file=None, checkpoint_dir: Path | None = None) -> dict:
    log = (lambda m: _log(log_file or sys.stdout, m))
    _seed_everything(args.seed, args.threads)
    start = time.time()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.arch, args.seed)
    log(f"policy: {n_parameters(model):,} parameters; {json.dumps(asdict(args))}")
    excluded: dict = {}
    stream = problem_stream(args.seed, arithmetic.Difficulty(min_ops=args.min_ops, max_ops=args.max_ops),
                            eval_prompts(), excluded)
    seen = {"problems": 0}

    def next_batch(step):
        batch = [next(stream) for _ in range(args.batch_size)]
        seen["problems"] += len(batch)
        return policy_batch(tokenizer, batch)

    def info(steps_done: int) -> dict:
        return {
            "model": "policy", "architecture": "LlamaForCausalLM", "n_parameters": n_parameters(model),
            "args": asdict(args) | {"steps_completed": steps_done},
            "data": {"generator": "itscale.tasks.arithmetic.generate", "difficulty": asdict(
                arithmetic.Difficulty(min_ops=args.min_ops, max_ops=args.max_ops)), "problem_seed": args.seed,
                "training_problems": seen["problems"], "excluded_eval_prompts_hit": excluded.get("excluded", 0),
                "target": "arithmetic.solution_text(problem) + <|end|>; loss on the assistant turn only"},
            "wall_time_s": round(time.time() - start, 1), "environment": environment(),
        }

    def checkpoint(step):
        if checkpoint_dir is not None:
            save_folder(model, tokenizer, Path(checkpoint_dir) / f"step-{step}", info(step))
            log(f"checkpoint step {step} saved")

    history = train_loop(model, args, next_batch, log, checkpoint)
    result = info(args.steps) | {"history": history}
    save_folder(model, tokenizer, out, result)
    log(f"saved policy to {out} after {result['wall_time_s']} s")
    return result


# --------------------------------------------------------------------------- PRM


def prm_example(tokenizer, problem: Problem, steps: Sequence[str], labels: Sequence[bool]):
    """Token ids and per-token targets: ``+``/``-`` after each tag (predicted from the tag's position)."""
    from .sampling import prm_encode, tag_ids

    _, good, bad = tag_ids(tokenizer)
    ids, tag_positions = prm_encode(tokenizer, problem, steps)
    assert len(tag_positions) == len(labels), (problem.prompt, steps)
    targets = [IGNORE] * len(ids)
    for pos, ok in zip(tag_positions, labels):
        # causal_lm_loss shifts by one: the target at pos + 1 is predicted from the tag at pos.
        targets[pos + 1] = good if ok else bad
    return ids, targets


def near_miss(problem: Problem, rng: np.random.Generator) -> tuple[list[str], list[bool]]:
    """A solution with exactly one slip, the kind the policy makes, and its exact labels.

    One operation line k (uniform) is wrong: its result off by ±1, ±2, ±10 or ±20, or
    two digits swapped (60%); the right result of a wrong operand (20%); or the
    operation skipped (20%). Later lines compute correctly from the wrong value, as
    the policy does after a slip, so the error is only visible at line k itself.
    Training on these teaches the PRM to check each line's arithmetic, which the
    policy's own samples (mostly long tails of steps after an early error) teach slowly.
    """
    start, ops = arithmetic.parse_prompt(problem.prompt)
    k = int(rng.integers(len(ops)))
    kind = rng.choice(["result", "operand", "skip"], p=[0.6, 0.2, 0.2])
    lines, value = [], start
    for i, (op, x) in enumerate(ops):
        if i == k and kind == "skip":
            continue
        true = arithmetic.apply(value, op, x)
        if i == k and kind == "operand":
            x = x + int(rng.choice([-2, -1, 1, 2])) if x > 2 else x + int(rng.integers(1, 3))
            true = arithmetic.apply(value, op, x)
        result = _slip(true, rng) if i == k and kind == "result" else true
        lines.append(f"{value}{op}{x}={result}")
        value = result
    lines.append(f"{arithmetic.ANSWER_PREFIX}{value}")
    steps = [line + arithmetic.DELIMITER for line in lines[:-1]] + [lines[-1]]
    return steps, arithmetic.step_labels(problem, steps)


def _slip(value: int, rng: np.random.Generator) -> int:
    digits = str(abs(value))
    if len(digits) >= 2 and rng.random() < 0.25:
        i = int(rng.integers(len(digits) - 1))
        swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:]
        if swapped != digits:
            return int(swapped) * (-1 if value < 0 else 1)
    return value + int(rng.choice([-20, -10, -2, -1, 1, 2, 10, 20]))


def collect_prm_data(policy, tokenizer, problems: Sequence[Problem], args: PRMArgs, log) -> list[tuple]:
    """Sample the policy, cut into steps, label each step exactly. Returns (problem, steps, labels)."""
    from .sampling import solve, split_steps

    t0 = time.time()
    completions = solve(policy, tokenizer, problems, n=args.samples_per_problem, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens, batch_size=args.sample_batch_size, seed=args.seed)
    log(f"sampled {len(problems)} x {args.samples_per_problem} solutions in {time.time() - t0:.0f} s")
    data, seen = [], set()
    for problem, comps in zip(problems, completions):
        for c in comps:
            steps = split_steps(c.text)
            if not steps:
                continue
            key = (problem.prompt, tuple(steps))
            if args.dedupe and key in seen:
                continue
            seen.add(key)
            data.append((problem, steps, arithmetic.step_labels(problem, steps)))
    return data


def _save_data(path: Path, data) -> None:
    Path(path).write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer, "steps": list(s),
                                              "labels": list(ls)}) + "\n" for p, s, ls in data))


def _load_data(path: Path) -> list[tuple]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [(Problem(r["id"], r["prompt"], r["answer"]), r["steps"], r["labels"]) for r in rows]


def train_prm(policy_dir: Path, out: Path, args: PRMArgs, log_file=None, init_dir: Path | None = None,
              data_cache: Path | None = None) -> dict:
    """Sample ``policy_dir``, then train the PRM starting from ``init_dir`` (default: the policy itself).

    ``data_cache``: a JSONL file of labelled samples; read when it exists, else written after
    sampling (for iterating on the PRM objective without re-sampling).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..stats import auroc
    from .sampling import prm_scores

    log = (lambda m: _log(log_file or sys.stdout, m))
    _seed_everything(args.seed, args.threads)
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    excluded: dict = {}
    stream = problem_stream(args.seed, arithmetic.Difficulty(min_ops=args.min_ops, max_ops=args.max_ops),
                            eval_prompts(), excluded)
    problems = [next(stream) for _ in range(args.n_problems)]
    t_sample = time.time()
    if data_cache is not None and Path(data_cache).is_file():
        data = _load_data(data_cache)
        log(f"read {len(data)} labelled samples from {data_cache}")
    else:
        data = collect_prm_data(policy, tokenizer, problems, args, log)
        if data_cache is not None:
            _save_data(data_cache, data)
    sample_s = time.time() - t_sample
    rng = random.Random(args.seed)
    prompts = sorted({p.prompt for p, _, _ in data})
    rng.shuffle(prompts)
    val_prompts = set(prompts[: int(len(prompts) * args.val_fraction)])
    train = [d for d in data if d[0].prompt not in val_prompts]
    val = [d for d in data if d[0].prompt in val_prompts]  # policy samples only, never synthetic
    if args.near_misses:
        slips = np.random.default_rng(args.seed + 1)
        train_problems = list({p.prompt: p for p, _, _ in train}.values())
        extra = [(p, *near_miss(p, slips)) for p in train_problems for _ in range(args.near_misses)]
        log(f"added {len(extra)} near-miss solutions ({args.near_misses} per training problem)")
        train = train + extra
    labels = [x for _, _, ls in train for x in ls]
    n_pos, n_neg = sum(labels), len(labels) - sum(labels)
    log(f"PRM data: {len(data)} solutions ({len(train)} train, {len(val)} val); train steps {len(labels)}: "
        f"{n_pos} correct, {n_neg} wrong")
    w_good, w_bad = ((len(labels) / (2 * n_pos), len(labels) / (2 * n_neg)) if args.balance and n_pos and n_neg
                     else (1.0, 1.0))

    if init_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
        assert AutoTokenizer.from_pretrained(init_dir).get_vocab() == tokenizer.get_vocab()
    elif args.init_from_policy:
        model = policy
    else:
        model = build_model(tokenizer, Architecture(), args.seed)
    model.train()
    _, good, bad = (None, *[tokenizer.convert_tokens_to_ids(t) for t in (EMBEDDED_TAG_FORMAT.good,
                                                                         EMBEDDED_TAG_FORMAT.bad)])
    encoded = [prm_example(tokenizer, p, s, ls) for p, s, ls in train]
    order = np.random.default_rng(args.seed)
    perm: list[int] = []

    def next_batch(step):
        nonlocal perm
        if len(perm) < args.batch_size:
            perm = perm + order.permutation(len(encoded)).tolist()
        idx, perm = perm[:args.batch_size], perm[args.batch_size:]
        # widths rounded up to a multiple of 16: fewer distinct shapes for the CPU kernels
        ids = right_pad([encoded[i][0] for i in idx], tokenizer.pad_token_id, 16)
        targets = right_pad([encoded[i][1] for i in idx], IGNORE, 16)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            mask[r, :len(encoded[i][0])] = 1
        return ids, mask, targets

    def weighted_loss(logits, targets):
        weights = torch.where(targets == good, w_good, torch.where(targets == bad, w_bad, 0.0)).float()
        return causal_lm_loss(logits, targets, weights)

    def val_auroc() -> float:
        scores = prm_scores(model, tokenizer, [(p, s) for p, s, _ in val])
        flat_s = [x for row in scores for x in row]
        flat_l = [x for _, _, ls in val for x in ls]
        return auroc(flat_l, flat_s)

    before = val_auroc() if val else float("nan")
    log(f"val AUROC before training: {before:.4f}")
    t_train = time.time()
    val_history = []

    def log_val(step):
        if val:
            val_history.append({"step": step, "val_auroc": val_auroc()})
            log(json.dumps(val_history[-1]))

    history = train_loop(model, args, next_batch, log, checkpoint=log_val, loss_fn=weighted_loss)
    train_s = time.time() - t_train
    after = val_auroc() if val else float("nan")
    log(f"val AUROC after training: {after:.4f}")
    val_labels = [x for _, _, ls in val for x in ls]
    result = {
        "model": "prm", "architecture": "LlamaForCausalLM", "n_parameters": n_parameters(model),
        "args": asdict(args), "policy": _describe_path(policy_dir),
        "init": "the policy's weights" if init_dir is None and args.init_from_policy else
                (str(init_dir) if init_dir is not None else "random"),
        "init_sha256": _sha256(Path(init_dir) / "model.safetensors") if init_dir is not None else None,
        "init_training_args": _summary(Path(init_dir) / "training_args.json") if init_dir is not None else None,
        "policy_sha256": _sha256(Path(policy_dir) / "model.safetensors"),
        "format": {"tag": EMBEDDED_TAG_FORMAT.tag, "good": EMBEDDED_TAG_FORMAT.good, "bad": EMBEDDED_TAG_FORMAT.bad,
                   "separator": EMBEDDED_TAG_FORMAT.separator,
                   "input": "chat prompt of the problem + EMBEDDED_TAG_FORMAT.render_steps(steps)",
                   "score": "p(good) / (p(good) + p(bad)) at each tag position"},
        "data": {"problem_seed": args.seed, "difficulty": asdict(arithmetic.Difficulty(args.min_ops, args.max_ops)),
                 "problems": len(problems), "excluded_eval_prompts_hit": excluded.get("excluded", 0),
                 "sampled_solutions": len(problems) * args.samples_per_problem,
                 "solutions_after_dedupe": len(data), "train_solutions": len(train), "val_solutions": len(val),
                 "train_steps_correct": n_pos, "train_steps_wrong": n_neg,
                 "val_steps_correct": sum(val_labels), "val_steps_wrong": len(val_labels) - sum(val_labels),
                 "class_weights": {"good": w_good, "bad": w_bad}},
        "val_auroc_before": before, "val_auroc_after": after,
        "sampling_wall_time_s": round(sample_s, 1), "training_wall_time_s": round(train_s, 1),
        "wall_time_s": round(time.time() - start, 1), "environment": environment(), "history": history, "val_history": val_history,
    }
    save_folder(model, tokenizer, out, result)
    log(f"saved PRM to {out} after {result['wall_time_s']} s")
    return result

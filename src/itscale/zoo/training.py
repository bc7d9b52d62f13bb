"""Training scripts of the embedded model pair.

Run through the CLI (never by tests or CI)::

    itscale zoo train-policy            # writes src/itscale/zoo/models/policy
    itscale zoo train-prm               # samples from that policy, writes .../models/prm

Both models are Llama-architecture causal LMs over the character-level tokenizer of
:mod:`itscale.zoo.tokenizer`. The policy learns ``arithmetic.solution_text`` of
freshly generated problems (loss on the assistant turn only).

The PRM starts from the policy's weights and learns to *verify*: at every step tag
``§`` it predicts ``+`` when the solution is still on track (the prefix label of
``arithmetic.step_labels``) and ``-`` when it is not (Math-Shepherd style). Its data
mixes the policy's own sampled solutions with synthetic near-miss solutions
(:func:`itscale.zoo.slips.training_solution`: one to three lines slipped, the rest
computed on from the slipped values), so that every batch holds many lines whose
arithmetic is off by a little. Auxiliary losses make the supervision dense:

* local labels (``arithmetic.local_step_labels``: is this line right *given the lines
  shown*), predicted at the separator after each tag, a position no scorer reads;
* digit labels: at each character of a result, does the result written so far agree
  with the line's own a op x (so the model learns *where* a result goes wrong);
* next-digit loss on right results (the PRM keeps learning to compute, which is what
  checking a result needs).

Training is resumable: every ``checkpoint_every`` steps the weights, optimizer, step
and history go to a checkpoint folder (atomically), and every batch is a function of
the seed and the step number, so ``--resume`` continues exactly where a killed run
stopped. Every setting, data size, device and wall time is written to
``training_args.json`` next to the weights.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..tasks import arithmetic
from ..types import Problem
from .recipes import RESUMABLE_CHANGES, Architecture, PolicyArgs, PRMArgs
from .tokenizer import CHAT_TEMPLATE, EOS, build_tokenizer, chat_prompt

IGNORE = -100


class TrainingSetupError(ValueError):
    """A training run cannot start as asked (device, checkpoint, settings); the message names the fix."""

def eval_prompts() -> set[str]:
    """Prompts of every shipped held-out set (never trained on)."""
    return {p.prompt for level in arithmetic.LEVELS for p in arithmetic.eval_set(level)}


def problem_stream(seed, difficulty: arithmetic.Difficulty, exclude: set[str],
                   counter: dict | None = None) -> Iterator[Problem]:
    """Endless seeded problems, skipping any whose prompt is in ``exclude``."""
    rng = np.random.default_rng(seed)
    i = 0
    while True:
        p = arithmetic.make_problem(*arithmetic.generate(rng, difficulty), f"train-{i}")
        i += 1
        if p.prompt in exclude:
            if counter is not None:
                counter["excluded"] = counter.get("excluded", 0) + 1
            continue
        yield p


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingSetupError(f"device: {name!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return device


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
    """``save_pretrained`` plus the fields other tooling needs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(device="cpu", dtype=torch.float32)
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


def environment(device: torch.device | None = None) -> dict:
    import tokenizers
    import transformers

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "tokenizers": tokenizers.__version__, "platform": platform.platform(), "threads": torch.get_num_threads()}
    if device is not None:
        env["device"] = str(device)
        env["device_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                              else platform.processor() or platform.machine())
        env["cpu_count"] = os.cpu_count()
    return env


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


# --------------------------------------------------------------------------- checkpoints


class Checkpoint:
    """A run's resumable state in ``folder/state.pt``: weights, optimizer, step, histories.

    Written to a temporary file and renamed, so a run killed while saving leaves the
    previous checkpoint intact. ``load`` refuses a state saved with other settings
    (except :data:`RESUMABLE_CHANGES`), naming the fields that differ.
    """

    def __init__(self, folder: Path, args: dict):
        self.folder = Path(folder)
        self.path = self.folder / "state.pt"
        self.args = args

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict:
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        saved = state["args"]
        differ = sorted(k for k in set(saved) | set(self.args)
                        if k not in RESUMABLE_CHANGES and saved.get(k) != self.args.get(k))
        if differ:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {self.args.get(k)!r}" for k in differ)
            raise TrainingSetupError(f"cannot resume from {self.path}: it was saved with other settings ({detail}); "
                             f"rerun with the checkpoint's settings or start over in another --checkpoint-dir")
        return state

    def save(self, step: int, model, optimizer, **extra) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"args": self.args, "step": step, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), **extra}, tmp)
        os.replace(tmp, self.path)


def last_step(steps: int, stop_at: int | None) -> int:
    """The step a run ends after: ``steps``, or ``stop_at`` when that comes first."""
    if stop_at is not None and stop_at < 1:
        raise TrainingSetupError(f"--stop-at {stop_at}: give a step of 1 or more (or leave it out)")
    return min(steps, stop_at) if stop_at is not None else steps


def _start_or_resume(checkpoint: Checkpoint | None, resume: bool, model, log) -> dict:
    """The saved state to continue from (weights loaded into ``model``), or {} for a new run."""
    if checkpoint is None:
        if resume:
            raise TrainingSetupError("--resume needs --checkpoint-dir")
        return {}
    if not checkpoint.exists():
        if resume:
            log(f"no checkpoint in {checkpoint.folder}; starting a new run")
        return {}
    state = checkpoint.load()
    if not resume:
        raise TrainingSetupError(f"{checkpoint.path} holds a run at step {state['step']} of "
                                 f"{state['args'].get('steps')}; pass --resume to continue it, or remove "
                                 f"{checkpoint.folder} to start over")
    end = last_step(checkpoint.args["steps"], checkpoint.args.get("stop_at"))
    if state["step"] > end:
        raise TrainingSetupError(f"--steps/--stop-at {end}: {checkpoint.path} is already at step "
                                 f"{state['step']}; pass {state['step']} or more")
    model.load_state_dict(state["model"])
    saved = state["args"]
    changed = {k: [saved.get(k), checkpoint.args.get(k)] for k in sorted(RESUMABLE_CHANGES)
               if saved.get(k) != checkpoint.args.get(k)}
    state["changed_on_resume"] = state.get("changed_on_resume", []) + [{"step": state["step"], **changed}]
    log(f"resuming from {checkpoint.path} at step {state['step']}" + (f"; changed: {changed}" if changed else ""))
    return state


# --------------------------------------------------------------------------- the loop


Batch = tuple[torch.Tensor, tuple[torch.Tensor, ...]]
LossFn = Callable[[torch.Tensor, tuple[torch.Tensor, ...]], tuple[torch.Tensor, dict]]


def train_loop(model, args, next_batch: Callable[[int], Batch], loss_fn: LossFn, log, device: torch.device,
               state: dict | None = None, on_checkpoint: Callable[[int, torch.optim.Optimizer, list], None] | None
               = None) -> list[dict]:
    """The shared loop: AdamW, warm-up + cosine, gradient clipping, optional bf16 autocast.

    ``next_batch(step)`` gives (input ids, targets); ``loss_fn(logits, targets)`` gives the
    loss and the numbers to log. ``state`` (from a checkpoint) restores the optimizer, the
    step and the history; ``on_checkpoint(step, optimizer, history)`` runs every
    ``args.checkpoint_every`` steps.
    """
    state = state or {}
    model.to(device)
    opt = make_optimizer(model, args.lr, args.weight_decay, args.betas)
    if "optimizer" in state:
        opt.load_state_dict(state["optimizer"])
    history: list[dict] = list(state.get("history", []))
    t0, window = time.time() - state.get("train_s", 0.0), []
    model.train()
    end = last_step(args.steps, args.stop_at)
    for step in range(state.get("step", 0), end):
        scale = lr_at(step, args.steps, args.warmup_steps, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = args.lr * scale
        input_ids, targets = next_batch(step)
        input_ids, targets = input_ids.to(device), tuple(t.to(device) for t in targets)
        # Rows are right-padded and attention is causal, so no real token ever sees a pad:
        # no mask needed (and SDPA's causal fast path is kept).
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16_autocast):
            logits = model(input_ids=input_ids).logits
        loss, numbers = loss_fn(logits.float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        window.append(numbers)
        if (step + 1) % args.log_every == 0 or step + 1 == end:
            row = {"step": step + 1, **{k: float(np.mean([w[k] for w in window])) for k in window[0]},
                   "lr": args.lr * scale, "grad_norm": float(gnorm), "elapsed_s": round(time.time() - t0, 1)}
            history.append(row)
            window = []
            log(json.dumps(row))
        if on_checkpoint is not None and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            on_checkpoint(step + 1, opt, history)
            model.train()
    model.eval()
    return history


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy on positions whose label is not IGNORE; also token accuracy."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    keep = shift_labels != IGNORE
    flat_logits, flat_labels = shift_logits[keep], shift_labels[keep]
    loss = torch.nn.functional.cross_entropy(flat_logits, flat_labels)
    acc = (flat_logits.argmax(-1) == flat_labels).float().mean().item()
    return loss, {"loss": loss.item(), "token_acc": acc}


# --------------------------------------------------------------------------- policy


def policy_batch(tokenizer, problems: Sequence[Problem]) -> Batch:
    prompts = tokenizer([chat_prompt(p.prompt) for p in problems], add_special_tokens=False)["input_ids"]
    answers = tokenizer([arithmetic.solution_text(p) + EOS for p in problems], add_special_tokens=False)["input_ids"]
    ids = [a + b for a, b in zip(prompts, answers)]
    labels = [[IGNORE] * len(a) + b for a, b in zip(prompts, answers)]
    return right_pad(ids, tokenizer.pad_token_id), (right_pad(labels, IGNORE),)


def _policy_loss(logits, targets):
    return causal_lm_loss(logits, targets[0])


def train_policy(out: Path, args: PolicyArgs, log_file=None, checkpoint_dir: Path | None = None,
                 resume: bool = False) -> dict:
    log = (lambda m: _log(log_file or sys.stdout, m))
    last_step(args.steps, args.stop_at)  # a bad --stop-at fails before any work
    _seed_everything(args.seed, args.threads)
    device = resolve_device(args.device)
    start = time.time()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.arch, args.seed)
    log(f"policy: {n_parameters(model):,} parameters on {device}; {json.dumps(asdict(args))}")
    checkpoint = Checkpoint(checkpoint_dir, asdict(args)) if checkpoint_dir is not None else None
    state = _start_or_resume(checkpoint, resume, model, log)
    excluded: dict = {}
    stream = problem_stream(args.seed, arithmetic.Difficulty(min_ops=args.min_ops, max_ops=args.max_ops),
                            eval_prompts(), excluded)
    for _ in range(state.get("step", 0) * args.batch_size):  # the stream is seeded: skip what was trained on
        next(stream)
    seen = {"problems": state.get("step", 0) * args.batch_size}
    earlier_s = state.get("wall_time_s", 0.0)

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
            "wall_time_s": round(earlier_s + time.time() - start, 1), "environment": environment(device),
        }

    def on_checkpoint(step, opt, history):
        if checkpoint is not None:
            checkpoint.save(step, model, opt, history=history, wall_time_s=earlier_s + time.time() - start,
                            train_s=earlier_s + time.time() - start)
            log(f"checkpoint at step {step} saved to {checkpoint.path}")

    history = train_loop(model, args, next_batch, _policy_loss, log, device, state, on_checkpoint)
    result = info(last_step(args.steps, args.stop_at)) | {"history": history, "resumed": state.get("changed_on_resume", [])}
    save_folder(model, tokenizer, out, result)
    log(f"saved policy to {out} after {result['wall_time_s']} s")
    return result


# --------------------------------------------------------------------------- PRM


def prm_example(tokenizer, problem: Problem, steps: Sequence[str]) -> tuple[list[int], tuple[list[int], ...]]:
    """Token ids and four per-token target rows (IGNORE elsewhere), each read by the loss
    one position later (the target at i + 1 is predicted from position i):

    * tag: ``+``/``-`` by the prefix label, predicted at each tag (what scorers read);
    * local: ``+``/``-`` by the local label, predicted at the separator after each tag;
    * digits: ``+``/``-`` at each character of an operation line's result: does the
      result written so far agree with a op x (computed from the line's own a and x)?
    * lm: each digit of the right result a op x, predicted from the character before it
      (the PRM keeps learning to compute what it checks; read over the ten digits only,
      so it shares positions with the digit labels without competing for their logits).
    """
    from ..rewards.formats import EMBEDDED_TAG_FORMAT as fmt
    from .sampling import prm_encode, tag_ids

    _, good, bad = tag_ids(tokenizer)
    ids, tags = prm_encode(tokenizer, problem, steps)
    prefix = arithmetic.step_labels(problem, steps)
    local = arithmetic.local_step_labels(problem, steps)
    n = len(ids)
    tag_t, local_t, digit_t, lm_t = [IGNORE] * n, [IGNORE] * n, [IGNORE] * n, [IGNORE] * n
    for step, pos, on_track, right in zip(steps, tags, prefix, local):
        tag_t[pos + 1] = good if on_track else bad
        if right is not None and pos + 2 < n:
            local_t[pos + 2] = good if right else bad
        m = arithmetic._OP.match(fmt.strip(step, arithmetic.DELIMITER))
        if m is None:
            continue
        shown, true = m.group(4), str(arithmetic.apply(int(m.group(1)), m.group(2), int(m.group(3))))
        first = pos - len(shown)  # one token per character: the result ends just before its tag
        for k in range(len(shown)):
            digit_t[first + k + 1] = good if shown[:k + 1] == true[:k + 1] else bad
            if shown == true and shown[k].isdigit():
                lm_t[first + k] = ids[first + k]
    return ids, (tag_t, local_t, digit_t, lm_t)


def balanced_binary_loss(logits: torch.Tensor, targets: torch.Tensor, good: int, bad: int) -> torch.Tensor:
    """Cross-entropy over {good, bad} where targets are set, the two classes weighted equally
    (mean over the good targets + mean over the bad ones, halved); 0 with no targets."""
    keep = targets != IGNORE
    pair = logits[keep][:, [good, bad]]
    is_bad = (targets[keep] == bad).long()
    ce = torch.nn.functional.cross_entropy(pair, is_bad, reduction="none")
    parts = [ce[is_bad == c].mean() for c in (0, 1) if bool((is_bad == c).any())]
    return sum(parts) / len(parts) if parts else logits.sum() * 0.0


def prm_loss(logits: torch.Tensor, targets: tuple[torch.Tensor, ...], good: int, bad: int, digits: torch.Tensor,
             local_weight: float, digit_weight: float, lm_weight: float) -> tuple[torch.Tensor, dict]:
    """tag loss + local_weight · local loss + digit_weight · digit-label loss + lm_weight ·
    next-digit loss (a softmax over the ten digit tokens ``digits``)."""
    logits = logits[:, :-1]
    tag_t, local_t, digit_t, lm_t = (t[:, 1:] for t in targets)
    tag = balanced_binary_loss(logits, tag_t, good, bad)
    local = balanced_binary_loss(logits, local_t, good, bad)
    digit = balanced_binary_loss(logits, digit_t, good, bad)
    keep = lm_t != IGNORE
    if bool(keep.any()):
        index = torch.searchsorted(digits, lm_t[keep])  # token id -> 0..9
        lm = torch.nn.functional.cross_entropy(logits[keep][:, digits], index)
    else:
        lm = logits.sum() * 0.0
    loss = tag + local_weight * local + digit_weight * digit + lm_weight * lm
    return loss, {"loss": loss.item(), "tag": tag.item(), "local": local.item(), "digit": digit.item(),
                  "lm": lm.item()}


def collect_policy_samples(policy, tokenizer, problems: Sequence[Problem], n: int, temperature: float,
                           max_new_tokens: int, batch_size: int, seed: int) -> list[tuple[Problem, list[str]]]:
    """The policy's sampled solutions cut into steps, duplicates dropped (labels come from the text)."""
    from .sampling import solve, split_steps

    completions = solve(policy, tokenizer, problems, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, seed=seed)
    data, seen = [], set()
    for problem, comps in zip(problems, completions):
        for c in comps:
            steps = split_steps(c.text)
            if steps and (problem.prompt, tuple(steps)) not in seen:
                seen.add((problem.prompt, tuple(steps)))
                data.append((problem, steps))
    return data


def save_samples(path: Path, data) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer, "steps": list(s)}) + "\n"
                           for p, s in data))
    os.replace(tmp, path)


def load_samples(path: Path) -> list[tuple[Problem, list[str]]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [(Problem(r["id"], r["prompt"], r["answer"]), r["steps"]) for r in rows]


@dataclass
class PRMValidation:
    """Validation numbers on fresh problems: step AUROC on the policy's samples at T = 0.8
    and the model card's slip test (:func:`itscale.zoo.evaluation.slip_test`)."""

    problems: list
    samples: list
    seed: int

    @classmethod
    def build(cls, policy, tokenizer, problems: Sequence[Problem], seed: int) -> "PRMValidation":
        samples = collect_policy_samples(policy, tokenizer, problems, n=4, temperature=0.8, max_new_tokens=128,
                                         batch_size=400, seed=seed)
        return cls(list(problems), samples, seed)

    def measure(self, model, tokenizer) -> dict:
        from ..stats import auroc
        from .evaluation import slip_test
        from .sampling import prm_scores

        scores = prm_scores(model, tokenizer, self.samples)
        labels = [x for p, s in self.samples for x in arithmetic.step_labels(p, s)]
        out = {"val_auroc": auroc(labels, [x for row in scores for x in row])}
        slips = slip_test(model, tokenizer, self.problems, seed=self.seed)
        return out | {f"slip_{kind}": r["last"] for kind, r in slips.items()}


def lift_items(validation: PRMValidation) -> list[tuple[Problem, list[str]]]:
    """The solutions whose tags set :func:`itscale.zoo.tag_lift.lift_tag_tokens`: the validation
    problems' policy samples and their reference solutions (fresh problems, never trained on)."""
    refs = [(p, arithmetic.reference_steps(*arithmetic.parse_prompt(p.prompt))) for p in validation.problems]
    return list(validation.samples) + refs


def validation_set(policy, tokenizer, args: PRMArgs) -> tuple[PRMValidation, set[str]]:
    """The run's validation problems ([seed, 1] stream, held-out prompts excluded) with
    their policy samples, and the prompts training must not see."""
    difficulty = arithmetic.Difficulty(min_ops=args.min_ops, max_ops=args.max_ops)
    held_out = eval_prompts()
    problems = list(_take(problem_stream([args.seed, 1], difficulty, held_out), args.val_problems))
    validation = PRMValidation.build(policy, tokenizer, problems, seed=args.seed + 1)
    return validation, held_out | {p.prompt for p in problems}


def train_prm(policy_dir: Path, out: Path, args: PRMArgs, log_file=None, init_dir: Path | None = None,
              checkpoint_dir: Path | None = None, resume: bool = False) -> dict:
    """Sample ``policy_dir``, then train the PRM starting from ``init_dir`` (default: the policy itself).

    ``checkpoint_dir`` keeps the run's state and the policy samples; with ``resume`` a
    killed run continues from its last checkpoint (same settings required).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sampling import tag_ids
    from .slips import training_solution

    log = (lambda m: _log(log_file or sys.stdout, m))
    last_step(args.steps, args.stop_at)  # a bad --stop-at fails before any work
    _seed_everything(args.seed, args.threads)
    device = resolve_device(args.device)
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    if init_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
        if AutoTokenizer.from_pretrained(init_dir).get_vocab() != tokenizer.get_vocab():
            raise TrainingSetupError(f"--init {init_dir}: its tokenizer is not the policy's")
    elif args.init_from_policy:
        model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    else:
        model = build_model(tokenizer, Architecture(), args.seed)
    checkpoint = Checkpoint(checkpoint_dir, asdict(args) | {"init_dir": str(init_dir) if init_dir else None}) \
        if checkpoint_dir is not None else None
    state = _start_or_resume(checkpoint, resume, model, log)
    earlier_s = state.get("wall_time_s", 0.0)
    log(f"PRM: {n_parameters(model):,} parameters on {device}; {json.dumps(asdict(args))}")

    difficulty = arithmetic.Difficulty(min_ops=args.min_ops, max_ops=args.max_ops)
    excluded: dict = {}
    validation, held_out = validation_set(policy, tokenizer, args)  # never train on a validation problem
    val_problems = validation.problems
    train_problems = list(_take(problem_stream([args.seed, 0], difficulty, held_out, excluded), args.n_problems))

    samples_path = Path(checkpoint_dir) / "policy_samples.jsonl" if checkpoint_dir is not None else None
    t_sample = time.time()
    if samples_path is not None and samples_path.is_file() and state:
        samples = load_samples(samples_path)
        log(f"read {len(samples)} policy samples from {samples_path}")
    else:
        samples = collect_policy_samples(policy, tokenizer, train_problems, args.samples_per_problem,
                                         args.temperature, args.max_new_tokens, args.sample_batch_size, args.seed)
        if samples_path is not None:
            samples_path.parent.mkdir(parents=True, exist_ok=True)
            save_samples(samples_path, samples)
        log(f"sampled {len(samples)} distinct solutions of {len(train_problems)} problems "
            f"in {time.time() - t_sample:.0f} s")
    sample_s = time.time() - t_sample
    del policy

    _, good, bad = tag_ids(tokenizer)
    digits = torch.tensor(sorted(tokenizer.convert_tokens_to_ids(list("0123456789"))), device=device)
    by_ops: dict[int, list] = {}
    for problem, steps in samples:
        by_ops.setdefault(len(arithmetic.parse_prompt(problem.prompt)[1]), []).append((problem, steps))

    def next_batch(step: int) -> Batch:
        """Batch ``step``: a function of (seed, step) only, so a resumed run sees the same data.

        Every row of a batch has the same number of operations (drawn per batch), so the
        rows have similar lengths and little padding is computed."""
        rng = np.random.default_rng([args.seed, 2, step])
        n_ops = int(rng.integers(args.min_ops, args.max_ops + 1))
        level = arithmetic.Difficulty(min_ops=n_ops, max_ops=n_ops)
        pool = by_ops.get(n_ops, [])
        rows = []
        while len(rows) < args.batch_size:
            if pool and rng.random() < args.policy_fraction:
                problem, steps = pool[int(rng.integers(len(pool)))]
            else:
                problem = arithmetic.make_problem(*arithmetic.generate(rng, level), "synthetic")
                if problem.prompt in held_out:
                    continue
                steps = training_solution(problem, rng, p_clean=args.p_clean, p_line=args.p_line)
            rows.append(prm_example(tokenizer, problem, steps))
        # widths rounded up to a multiple of 16: fewer distinct shapes for the CPU kernels
        ids = right_pad([r[0] for r in rows], tokenizer.pad_token_id, 16)
        return ids, tuple(right_pad([r[1][i] for r in rows], IGNORE, 16) for i in range(4))

    def loss_fn(logits, targets):
        return prm_loss(logits, targets, good, bad, digits, args.local_weight, args.digit_weight, args.lm_weight)

    val_history: list[dict] = list(state.get("val_history", []))
    if not state:
        val_history.append({"step": 0, **validation.measure(model, tokenizer)})
        log(json.dumps(val_history[-1]))
    t_train = time.time()
    earlier_train_s = state.get("train_s", 0.0)

    def on_checkpoint(step, opt, history):
        val_history.append({"step": step, **validation.measure(model.eval(), tokenizer)})
        log(json.dumps(val_history[-1]))
        if checkpoint is not None:
            checkpoint.save(step, model, opt, history=history, val_history=val_history,
                            changed_on_resume=state.get("changed_on_resume", []),
                            wall_time_s=earlier_s + time.time() - start,
                            train_s=earlier_train_s + time.time() - t_train)
            log(f"checkpoint at step {step} saved to {checkpoint.path}")

    model.to(device)
    history = train_loop(model, args, next_batch, loss_fn, log, device, state, on_checkpoint)
    model.to("cpu")
    from .tag_lift import lift_tag_tokens

    # scores unchanged (see tag_lift); a lift that falls short is recorded, not fatal after hours of training
    tag_lift = lift_tag_tokens(model, tokenizer, lift_items(validation), strict=False)
    log(("WARNING: tag tokens not lifted to the margin everywhere (a server's top-k may miss them): "
         if tag_lift["short"] else "tag tokens lifted: ") + json.dumps(tag_lift))
    final = validation.measure(model, tokenizer)
    log(json.dumps({"final": final}))
    labels = [x for p, s in samples for x in arithmetic.step_labels(p, s)]
    result = {
        "model": "prm", "architecture": "LlamaForCausalLM", "n_parameters": n_parameters(model),
        "args": asdict(args), "policy": _describe_path(policy_dir),
        "init": "the policy's weights" if init_dir is None and args.init_from_policy else
                (str(init_dir) if init_dir is not None else "random"),
        "init_sha256": _sha256(Path(init_dir) / "model.safetensors") if init_dir is not None else None,
        "init_training_args": _summary(Path(init_dir) / "training_args.json") if init_dir is not None else None,
        "policy_sha256": _sha256(Path(policy_dir) / "model.safetensors"),
        "format": {"tag": "§", "good": "+", "bad": "-", "separator": "\n",
                   "input": "chat prompt of the problem + EMBEDDED_TAG_FORMAT.render_steps(steps)",
                   "score": "p(good) / (p(good) + p(bad)) at each tag position (prefix label: still on track)"},
        "objective": "balanced tag loss (prefix labels, at each tag) + local_weight * balanced local loss "
                     "(arithmetic.local_step_labels, at the separator after each tag) + digit_weight * balanced "
                     "loss on each result character (does the result so far agree with a op x) + lm_weight * "
                     "next-digit loss on right results (softmax over the ten digits); see prm_example",
        "data": {"seeds": {"train_problems": [args.seed, 0], "validation_problems": [args.seed, 1],
                           "policy_sampling": args.seed, "batch_of_step_s": [args.seed, 2, "s"]},
                 "difficulty": asdict(difficulty), "policy_sample_problems": len(train_problems),
                 "excluded_held_out_prompts_hit": excluded.get("excluded", 0),
                 "policy_samples": len(samples), "policy_sample_steps_correct": sum(labels),
                 "policy_sample_steps_wrong": len(labels) - sum(labels),
                 "synthetic": "itscale.zoo.slips.training_solution (fresh problems per batch)",
                 "training_sequences": last_step(args.steps, args.stop_at) * args.batch_size,
                 "validation": {"problems": len(val_problems), "policy_samples": len(validation.samples)}},
        "validation": final,
        "sampling_wall_time_s": round(sample_s, 1),
        "training_wall_time_s": round(earlier_train_s + time.time() - t_train, 1),
        "wall_time_s": round(earlier_s + time.time() - start, 1), "environment": environment(device),
        "history": history, "val_history": val_history,
        "resumed": state.get("changed_on_resume", []),
        "tag_lift": tag_lift,
    }
    save_folder(model, tokenizer, out, result)
    log(f"saved PRM to {out} after {result['wall_time_s']} s")
    return result


def _take(stream: Iterator[Problem], n: int) -> Iterator[Problem]:
    for _ in range(n):
        yield next(stream)

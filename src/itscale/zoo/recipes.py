"""The settings of the embedded models' training runs (no torch: the CLI reads the defaults).

Every field is recorded in ``training_args.json`` beside the weights; the defaults are
the recipes of the shipped models (see MODEL_CARD.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .tokenizer import MODEL_MAX_LENGTH

#: Settings that may change between a run and its resumption. All but ``steps`` leave the
#: result unchanged; a new ``steps`` stops a run early or extends it (the cosine schedule
#: follows the new total from the resumed step on, and the change is recorded). ``stop_at``
#: ends a run after that step with the schedule still laid out over ``steps``.
RESUMABLE_CHANGES = frozenset({"threads", "log_every", "device", "checkpoint_every", "steps", "stop_at"})


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
class RunArgs:
    """What every training run shares: the optimizer, the schedule's shape, the task's size, the machine."""

    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    min_ops: int = 2
    max_ops: int = 6
    bf16_autocast: bool = True
    threads: int = 2
    device: str = "auto"
    stop_at: int | None = None  # end after this step; the lr schedule still spans ``steps``


@dataclass
class PolicyArgs(RunArgs):
    seed: int = 1234
    steps: int = 750
    warmup_steps: int = 60
    log_every: int = 25
    checkpoint_every: int = 50
    arch: Architecture = field(default_factory=Architecture)


@dataclass
class PRMArgs(RunArgs):
    seed: int = 4321
    # the policy's own solutions, sampled once (kept in the checkpoint folder)
    n_problems: int = 3000
    samples_per_problem: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 128
    sample_batch_size: int = 400
    # each batch: this share from the policy's samples, the rest synthetic near misses
    policy_fraction: float = 0.2
    p_clean: float = 0.2  # share of synthetic solutions with no corrupted line
    p_line: float = 0.3  # in the others: one corrupted line, and each other line with this probability
    # objective: balanced tag loss + local_weight * balanced local loss + digit_weight * balanced
    # digit-label loss + lm_weight * next-digit loss (training.prm_example, training.prm_loss)
    local_weight: float = 1.0
    digit_weight: float = 1.0
    lm_weight: float = 0.5
    steps: int = 8000
    warmup_steps: int = 100
    init_from_policy: bool = True
    log_every: int = 50
    checkpoint_every: int = 500  # also: how often the validation numbers are measured
    val_problems: int = 200  # fresh problems (never trained on) for the validation numbers

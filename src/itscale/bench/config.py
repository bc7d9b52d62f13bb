"""The bench configuration: one YAML or TOML file, validated with errors that name the field.

Example (YAML)::

    problems:
      source: arithmetic:medium      # or word_problems:v1, or a .jsonl / .parquet file: problem, answer[, id, level]
      limit: 100
    policy:
      model: embedded                # or a Hugging Face folder, a .gguf file, or http(s):// URL(s)
      device: auto                   # auto | cpu | cuda | cuda:N | mps (a local model)
      dtype: auto                    # auto | float32 | bfloat16 | float16
      temperature: 0.8
    prm:
      model: embedded                # the same choices, or "none"
      kind: tag                      # tag | classifier
    format: arithmetic               # step format: arithmetic | math | {delimiter, answer_markers, max_steps}
    methods:
      - name: particle_filtering
      - name: beam_search
        params: {beam_width: 2}
        budgets: [2, 4, 8, 16]       # overrides the sweep's budgets for this method
    budgets: [1, 2, 4, 8, 16]
    seeds: [0]
    output: runs/medium
    allocation:                      # optional: learn a compute-optimal allocation after the sweep
      probe: agreement               # difficulty score: agreement | prm
      probe_samples: 4
      bins: 5
      train_fraction: 0.5
      budgets: [4, 8, 16]            # cost levels, in whole samples per problem (default: the sweep's)
    ray:                             # optional: run the work units on a Ray cluster (itscale.bench.ray_sweep)
      address: "10.0.0.1:6379"       # a running cluster's GCS address (`ray start --head`); omit: RAY_ADDRESS or a local one
      workers: 16                    # actors, each loading the backends once (default: the cluster's CPUs / num_cpus)
      num_gpus: 1                    # per worker: where its local models go

``policy`` and ``prm`` are the backend specs of :mod:`itscale.backends.spec` (the
policy adds its sampling settings). Each method is checked against the strategy registry when the file is loaded: unknown
method names, unknown or invalid parameters, and budgets a method cannot run (a beam
width that does not divide the budget) are reported before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..backends.spec import PolicySpec, PRMSpec
from ..strategies import STRATEGIES, PooledStrategy, make_strategy
from ..tasks import arithmetic
from ..types import SamplingParams, StepFormat

FORMATS: dict[str, StepFormat] = {
    "arithmetic": arithmetic.STEP_FORMAT,
    "math": StepFormat(delimiter="\n\n", answer_markers=("\\boxed{",), max_steps=32),
}


class ConfigError(ValueError):
    """A bad configuration; the message names the field and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProblemsConfig(_Strict):
    source: str = Field("arithmetic:medium", description="bundled set 'arithmetic:LEVEL' or 'word_problems:v1', "
                                                         "or a .jsonl/.parquet file")
    template: str | None = Field(None, description="prompt template: plain, boxed, steps, or a string with {problem} "
                                                   "(default for a file: plain with the embedded policy, else boxed)")
    limit: int | None = Field(None, ge=1, description="use the first LIMIT problems")
    on_bad_row: Literal["fail", "skip"] = Field("fail", description="what a malformed row does")

    @field_validator("source")
    @classmethod
    def _a_source_that_exists(cls, value: str) -> str:
        from .problems import BUNDLED_PREFIX, BUNDLED_SETS, SHIPPED_FILES

        if not value.startswith(BUNDLED_PREFIX) and value not in SHIPPED_FILES and not Path(value).is_file():
            what = "is a folder, not a file" if Path(value).is_dir() else "does not exist"
            raise ValueError(f"problem file {value!r} {what} (bundled sets: {', '.join(BUNDLED_SETS)})")
        return value


class PolicyConfig(PolicySpec):
    """The policy (:class:`~itscale.backends.spec.PolicySpec`) and how it samples."""

    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_step_tokens: int = Field(48, ge=1, description="token limit of one step")

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_step_tokens=self.max_step_tokens)


class PRMConfig(PRMSpec):
    """The reward model (:class:`~itscale.backends.spec.PRMSpec`)."""


class FormatConfig(_Strict):
    delimiter: str = "\n\n"
    answer_markers: tuple[str, ...] = ("\\boxed{",)
    max_steps: int = Field(32, ge=1)

    def step_format(self) -> StepFormat:
        return StepFormat(delimiter=self.delimiter, answer_markers=self.answer_markers, max_steps=self.max_steps)


class MethodConfig(_Strict):
    name: str
    label: str | None = Field(None, description="name in tables and plots (default: the method name)")
    params: dict[str, Any] = Field(default_factory=dict)
    budgets: list[int] | None = Field(None, description="budgets for this method (default: the sweep's)")

    @property
    def key(self) -> str:
        return self.label or self.name


class AllocationConfig(_Strict):
    """Learn a compute-optimal allocation from the sweep (:mod:`itscale.allocation`,
    :mod:`itscale.bench.allocation`)."""

    probe: Literal["agreement", "prm"] = Field("agreement", description="difficulty score: 1 − the modal answer's "
                                                                        "share (agreement) or 1 − the mean PRM score")
    probe_samples: int = Field(4, ge=1, description="whole samples per problem in the probe (one request)")
    aggregation: Literal["last", "min", "prod", "mean", "model"] = Field(
        "last", description="how the prm probe reads a sample's step scores")
    bins: int = Field(5, ge=1, le=50, description="difficulty bins: quantiles of the probe score on the training split")
    train_fraction: float = Field(0.5, gt=0, lt=1,
                                  description="share of the problems (by a hash of the id) to learn on")
    budgets: list[int] | None = Field(None, min_length=1, description="cost levels: budget B allows the mean cost "
                                                                      "of B whole samples per problem (default: the "
                                                                      "sweep's)")
    answer_from_probe: bool = Field(True, description="a bin may answer with the probe's own vote, spending no more")

    @field_validator("budgets")
    @classmethod
    def _positive_and_distinct(cls, values: list[int] | None) -> list[int] | None:
        if values is None:
            return None
        if any(b < 1 for b in values) or len(set(values)) != len(values):
            raise ValueError(f"cost levels must be distinct positive integers (budgets in whole samples), got {values}")
        return sorted(values)

    @field_validator("probe_samples")
    @classmethod
    def _samples_fit_the_score(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("probe") == "agreement" and value < 2:
            raise ValueError(f"the agreement score compares samples, so it needs at least 2 (got {value}); use 4, "
                             "or probe: prm")
        return value


class RayConfig(_Strict):
    """Where and how the sweep runs on Ray (:mod:`itscale.bench.ray_sweep`). None of it changes
    a record: it is left out of every store key, so a sweep started on one machine finishes on a
    cluster and the other way round."""

    address: str | None = Field(None, description="a running cluster: HOST:PORT of its head (`ray start --head`), "
                                                  "ray://HOST:PORT (Ray client) or 'auto'; omitted: RAY_ADDRESS, "
                                                  "else a cluster started on this machine")
    workers: int | None = Field(None, ge=1, description="worker actors, each loading the backends once (default: "
                                                        "the cluster's CPUs divided by num_cpus)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per worker (its torch threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per worker, where its local models are placed")
    chunk: int = Field(16, ge=1, description="problems per work unit (a unit is batched across its problems)")
    retries: int = Field(3, ge=0, description="times a unit whose worker died is given to another worker")

    @field_validator("address")
    @classmethod
    def _an_address(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        from .ray_sweep import parse_address

        parse_address(value)  # a ValueError names what is wrong
        return value


class BenchConfig(_Strict):
    problems: ProblemsConfig = ProblemsConfig()
    policy: PolicyConfig = PolicyConfig()
    prm: PRMConfig = PRMConfig()
    format: str | FormatConfig = "arithmetic"
    methods: list[MethodConfig] = Field(min_length=1)
    budgets: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    concurrency: int = Field(128, ge=1, description="problems in flight at once")
    subsets: int = Field(64, ge=1, description="random subsets per budget when subsampling the best-of-N family")
    output: str = Field("itscale-bench", description="folder for the store, exports, plots and report")
    allocation: AllocationConfig | None = Field(None, description="learn a compute-optimal allocation after the sweep")
    ray: RayConfig | None = Field(None, description="run the work units on a Ray cluster (`itscale bench --ray`)")

    @field_validator("budgets", "seeds")
    @classmethod
    def _distinct(cls, values: list[int]) -> list[int]:
        if len(set(values)) != len(values):
            raise ValueError(f"values must be distinct, got {values}")
        return sorted(values)

    @field_validator("budgets")
    @classmethod
    def _positive(cls, values: list[int]) -> list[int]:
        if any(b < 1 for b in values):
            raise ValueError(f"budgets must be positive integers, got {values}")
        return values

    @field_validator("output")
    @classmethod
    def _a_folder(cls, value: str) -> str:
        if Path(value).exists() and not Path(value).is_dir():
            raise ValueError(f"{value!r} is a file; name a folder (it is created if missing)")
        return value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value):
        if isinstance(value, str) and value not in FORMATS:
            raise ValueError(f"unknown format {value!r}; choose one of {sorted(FORMATS)} or give "
                             "{delimiter, answer_markers, max_steps}")
        return value

    @model_validator(mode="after")
    def _methods_runnable(self) -> "BenchConfig":
        labels = [m.key for m in self.methods]
        for i, m in enumerate(self.methods):
            where = f"methods[{i}]"
            if m.key in labels[:i]:
                raise ValueError(f"{where}: label {m.key!r} is used twice; give each entry a distinct label")
            if m.name not in STRATEGIES:
                raise ValueError(f"{where}.name: unknown method {m.name!r}; choose one of: {', '.join(sorted(STRATEGIES))}")
            cls = STRATEGIES[m.name]
            if cls.needs_prm and not self.prm.enabled:
                raise ValueError(f"{where}: {m.name} needs a reward model, but prm.model is 'none'")
            reserved = sorted({"format", "sampling", "answer_key"} & set(m.params))
            if reserved:
                raise ValueError(f"{where}.params.{reserved[0]}: set it for the whole sweep (top-level "
                                 "format, policy sampling settings), not per method")
            try:
                strategy = make_strategy(m.name, _UNBOUND, _UNBOUND, **m.params)
            except ValueError as err:
                raise ValueError(f"{where}.params: {err}") from None
            if getattr(strategy, "uses_prm", False) and not self.prm.enabled:  # (compute_optimal: its policy says)
                raise ValueError(f"{where}: {m.name} with these params needs a reward model, but prm.model is 'none'")
            for b in m.budgets or ():  # (the sweep's budgets are fitted to the method: method_budgets)
                try:
                    strategy.check_budget(b)
                except ValueError as err:
                    takes = strategy.budgets_up_to(max(max(m.budgets), max(self.budgets)))
                    raise ValueError(f"{where}.budgets: {err}; set budgets this method takes, e.g. "
                                     f"budgets: {takes[:6] or '[...]'}") from None
            if issubclass(cls, PooledStrategy) and m.budgets is not None:
                raise ValueError(f"{where}.budgets: {m.name} is computed for every sweep budget from one pool; "
                                 "remove its budgets")
        return self

    @model_validator(mode="after")
    def _allocation_learnable(self) -> "BenchConfig":
        a = self.allocation
        if a is None:
            return self
        if a.probe == "prm" and not self.prm.enabled:
            raise ValueError("allocation.probe: 'prm' scores difficulty with the reward model, but prm.model is "
                             "'none'; use probe: agreement")
        if not self.allocation_options():
            raise ValueError("allocation: the methods give it nothing to choose from (compute_optimal applies an "
                             "allocation, it is not an option); add methods such as self_consistency or best_of_n")
        return self

    # -- derived -------------------------------------------------------------------
    def method_budgets(self, m: MethodConfig) -> list[int]:
        """The budgets ``m`` runs at: its own; else the sweep's that it can run at; else, when it
        takes none of them (e.g. chains × rounds = 6 and budgets 1–16), the budgets it takes up to
        the sweep's largest (:meth:`budget_notes` says so)."""
        if m.budgets is not None:
            return sorted(set(m.budgets))
        if m.name == "greedy":  # one sample whatever the budget
            return [1]
        strategy = make_strategy(m.name, _UNBOUND, _UNBOUND, **m.params)
        fitting = [b for b in self.budgets if strategy.fits(b)]
        return fitting or strategy.budgets_up_to(max(self.budgets))

    def budget_notes(self) -> list[str]:
        """One line per method that runs at other budgets than the sweep's (see :meth:`method_budgets`)."""
        notes = []
        for m in self.methods:
            if m.budgets is None and m.name != "greedy" and (runs := self.method_budgets(m)) != list(self.budgets):
                notes.append(f"{m.key}: budgets {runs} (it cannot run at "
                             f"{[b for b in self.budgets if b not in runs]})")
        return notes

    def problem_template(self) -> str | None:
        """``problems.template``; unset, the embedded policy's own for a problem file (its bare
        prompts), else the loader's default (``boxed`` for files, the task's prompts for bundled sets)."""
        if self.problems.template is not None:
            return self.problems.template
        from .. import zoo
        from .problems import BUNDLED_PREFIX

        if self.policy.is_embedded and not self.problems.source.startswith(BUNDLED_PREFIX):
            return zoo.PROMPT_TEMPLATE
        return None

    def step_format(self) -> StepFormat:
        return FORMATS[self.format] if isinstance(self.format, str) else self.format.step_format()

    def backend_fingerprint(self) -> dict:
        """What the results depend on besides the method: models, sampling, format."""
        # placement and transport settings do not change a record; stores written before a
        # setting existed keep their keys while it is at its default
        placement = {"threads", "max_batch", "device", "api_key_env", "timeout", "retries", "max_concurrency"}
        policy = placement | (set() if self.policy.is_http else {"merge_prompts", "kv_block"})
        if self.policy.kv_block is None:
            policy.add("kv_block")
        prm = placement | {"merge_prompts"}
        for spec, excluded in ((self.policy, policy), (self.prm, prm)):
            excluded.update(k for k, default in _ADDED_LATER.items() if getattr(spec, k, default) == default)
        return {"policy": self.policy.model_dump(exclude=policy),
                "prm": self.prm.model_dump(exclude=prm),
                "format": self.format if isinstance(self.format, str) else self.format.model_dump()}

    def method_hash(self, m: MethodConfig, problem_set_fingerprint: str) -> str:
        """The store key part that changes whenever a record of ``m`` would change."""
        spec = {"method": m.name, "params": _params_key(m), "problems": problem_set_fingerprint,
                **self.backend_fingerprint()}
        return _hash(spec)

    def allocation_options(self) -> list[MethodConfig]:
        """The methods an allocation may choose among (all but compute_optimal, which applies one)."""
        return [m for m in self.methods if m.name not in _NOT_AN_OPTION]

    def probe_hash(self, problem_set_fingerprint: str) -> str:
        """The store key of the allocation probes: what a probe's outcome depends on."""
        a = self.allocation or AllocationConfig()
        probe = {"score": a.probe, "samples": a.probe_samples,
                 "aggregation": a.aggregation if a.probe == "prm" else None}
        return _hash({"probe": probe, "problems": problem_set_fingerprint, **self.backend_fingerprint()})

    def pool_hash(self, scoring: dict, problem_set_fingerprint: str) -> str:
        spec = {"pool": scoring, "problems": problem_set_fingerprint, **self.backend_fingerprint()}
        return _hash(spec)


#: Settings added after stores existed, left out of the store key while at their defaults.
_ADDED_LATER = {"dtype": "auto", "step_tag": None, "good_token": "+", "bad_token": "-", "positive_label": 1,
                "template": None, "measure": "self-certainty"}


#: Methods an allocation never chooses (compute_optimal applies a learnt allocation itself).
_NOT_AN_OPTION = ("compute_optimal",)


#: Method defaults that changed after stores existed: ``(method, param): (old, new)``. A record
#: written while the param was unset ran with the old default, so the key reads an unset param
#: as the new default, and the old default as unset: a store's records stay valid, and none
#: computed under the old default is taken for the new one. (mcts: progressive widening.)
_CHANGED_DEFAULTS = {("mcts", "widening"): (None, 0.5)}


def _params_key(m: MethodConfig) -> dict:
    """A method's params as its store key sees them: a policy file (compute_optimal's
    ``allocation``) by its content, so that a new policy in the same file is new work; a
    changed default by its value (:data:`_CHANGED_DEFAULTS`)."""
    params = dict(m.params)
    for (method, name), (old, new) in _CHANGED_DEFAULTS.items():
        if m.name == method:
            value = params.get(name, new)
            if value == old:
                params.pop(name, None)
            else:
                params[name] = value
    path = params.get("allocation")
    if m.name == "compute_optimal" and isinstance(path, str) and Path(path).expanduser().is_file():
        digest = hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
        params["allocation"] = {"file": path, "sha256": digest}
    return params


class _Unbound:
    """Stands in for the backends while a configuration is validated."""

    capabilities = None


_UNBOUND = _Unbound()


def _hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _field(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("FormatConfig", "str") and not str(part).startswith("function-"):
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def validate_config(data: Any, source: str = "config") -> BenchConfig:
    """A :class:`BenchConfig` from parsed data; :class:`ConfigError` names every bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level, got {type(data).__name__}")
    try:
        return BenchConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            if e["type"] == "string_type" and "str" in e["loc"] and isinstance(e["input"], dict):
                continue  # the mapping branch of a str-or-mapping field reports the real problem
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown setting (check the spelling; `itscale bench --help` lists the settings)"
            lines.append(f"{source}: {_field(e['loc'])}: {msg}" if e["loc"] else f"{source}: {msg}")
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None


def load_config(path: str | Path, overrides: dict | None = None) -> BenchConfig:
    """Read a ``.yaml``/``.yml`` or ``.toml`` file; ``overrides`` replace top-level sections."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a .yaml, .yml or .toml file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"{path}: unsupported config type {path.suffix!r}; use .yaml, .yml or .toml")
    except ConfigError:
        raise
    except Exception as err:  # yaml.YAMLError, tomllib.TOMLDecodeError: both carry line numbers
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {err}") from None
    if isinstance(data, dict) and overrides:
        data = merge(data, overrides)
    return validate_config(data, str(path))


def merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied; nested mappings are merged key by key."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

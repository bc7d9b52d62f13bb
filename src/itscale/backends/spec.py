"""What a backend is made from: a validated spec for a policy or a reward model.

A :class:`PolicySpec` or :class:`PRMSpec` names a model and how to run it; the
:mod:`itscale.backends.load` functions turn it into a backend. The same specs sit in a
bench configuration (``policy:`` / ``prm:``), behind ``itscale serve``'s flags, and behind
``itscale.load_policy(...)`` / ``itscale.load_prm(...)``.

``model`` is one of

- ``embedded``: the model shipped in :mod:`itscale.zoo`;
- a local Hugging Face folder (what ``save_pretrained`` writes);
- a ``.gguf`` file (transformers loads it; needs the ``gguf`` package);
- one or more ``http(s)://`` URLs of OpenAI-compatible servers (vLLM, llama.cpp, hosted
  APIs), load-balanced;
- ``module.path:function`` (a PRM of ``kind: verifier``): a Python function that scores the
  latest step (:mod:`itscale.rewards.verifier`);
- for a PRM of ``kind: judge``, any chat model (local or URL) asked about each step
  (:mod:`itscale.rewards.judge`); of ``kind: confidence``, a local causal LM (normally the
  policy's own model; ``embedded`` is the embedded *policy*) whose confidence in the
  solution is the score (:mod:`itscale.rewards.confidence`);
- ``none`` (a PRM only): no reward model.

``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) and ``dtype`` (``auto``,
``float32``, ``bfloat16``, ``float16``) place a local model: ``auto`` picks CUDA when it
is present (else MPS, else the CPU), and the checkpoint's 16-bit dtype on a GPU, float32
otherwise (:func:`itscale.lm.loading.resolve_device`, ``resolve_dtype``). They are
ignored for URLs. Everything here is checked without importing torch; whether a CUDA
device is really present is checked when the model is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..rewards.verifier import is_callable_reference

__all__ = ["DEVICES", "DTYPES", "Measure", "ModelSpec", "PRMKind", "PRMSpec", "PolicySpec", "is_url"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
PRMKind = Literal["tag", "classifier", "verifier", "judge", "confidence"]  # how a reward model scores steps
Measure = Literal["self-certainty", "mean-logprob"]  # a confidence PRM's measure
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def is_url(model: str) -> bool:
    return model.startswith(("http://", "https://"))


class ModelSpec(BaseModel):
    """Fields shared by policies and reward models (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | list[str] = Field("embedded", description="'embedded', a Hugging Face folder, a .gguf file, or "
                                                           "one or more http(s):// URLs")
    device: str = Field("auto", description="local model: auto | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="local model: weights' dtype")
    tokenizer: str | None = Field(None, description="folder (or .gguf file) with the tokenizer and chat template "
                                                    "(default: the model's own; for a URL, the served name when it "
                                                    "is a local folder)")
    served_model: str | None = Field(None, description="URL: the model name on the server (default: the only one "
                                                       "it serves)")
    max_batch: int = Field(256, ge=1, description="local model: rows run together")
    # HTTP settings
    api_key_env: str | None = Field(None, description="URL: environment variable holding the API key")
    timeout: float = Field(60.0, gt=0, description="URL: seconds per HTTP attempt")
    retries: int = Field(4, ge=0, description="URL: extra attempts after 429, 5xx and connection errors")
    max_concurrency: int = Field(64, ge=1, description="URL: HTTP requests in flight at once")
    merge_prompts: int = Field(256, ge=1, description="URL: contexts sent in one request (fast, but the server "
                                                      "cannot seed them); 1 = one seeded request each")

    @field_validator("model")
    @classmethod
    def _a_model_that_exists(cls, value: str | list[str]) -> str | list[str]:
        """URLs are checked when the backend is loaded; a folder or file here, before any output is written."""
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one URL")
            bad = [v for v in value if not is_url(v)]
            if bad:
                raise ValueError(f"a list of models must be http(s):// URLs of one model's servers; {bad[0]!r} is not")
            return value[0] if len(value) == 1 else value
        if value.lower() in ("embedded", "none") or is_url(value) or is_callable_reference(value):
            return value  # (a module:function is imported when loaded: kind verifier)
        path = Path(value).expanduser()
        if value.endswith(".gguf"):
            if not path.is_file():
                raise ValueError(f"{value!r}: no such .gguf file")
            return value
        if not path.is_dir():
            what = "is a file, not a model folder" if path.is_file() else "is not a folder"
            raise ValueError(f"{value!r} {what}; give 'embedded', a local Hugging Face folder, a .gguf file or an "
                             "http(s):// URL of an OpenAI-compatible server")
        return value

    @field_validator("device")
    @classmethod
    def _a_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"unknown device {value!r}; choose one of {', '.join(DEVICES)}")
        return value

    @property
    def urls(self) -> list[str]:
        """The server URLs (empty for a local model)."""
        models = self.model if isinstance(self.model, list) else [self.model]
        return [m for m in models if is_url(m)]

    @property
    def is_http(self) -> bool:
        return bool(self.urls)

    @property
    def is_embedded(self) -> bool:
        return self.model == "embedded"

    def local_path(self, embedded: Path) -> Path:
        """The folder or .gguf file of a local model (``embedded``: the zoo's folder)."""
        return embedded if self.is_embedded else Path(str(self.model)).expanduser()


class PolicySpec(ModelSpec):
    """A policy: the model that proposes steps."""

    @field_validator("model")
    @classmethod
    def _a_policy(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str) and (value.lower() == "none" or is_callable_reference(value)):
            raise ValueError("a policy is needed: give 'embedded', a folder, a .gguf file or URL(s)")
        return value

    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    kv_block: int | None = Field(None, ge=1, description="URL: the server's KV block size (vLLM: 16 on GPU, 32 on "
                                                         "CPU as the tests start it) for block-aligned look-ahead; "
                                                         "unset: steps stop at the delimiter")


class PRMSpec(ModelSpec):
    """A process reward model; ``model: none`` for no reward model."""

    model: str | list[str] = Field("embedded", description="'embedded', a Hugging Face folder, a .gguf file, one or "
                                                           "more http(s):// URLs, or 'none'")
    kind: PRMKind = Field(
        "tag", description="how the model scores steps: 'tag' (a causal LM read after a tag token), 'classifier' "
                           "(token classification at a separator), 'verifier' (model is a Python function "
                           "module.path:function scoring the latest step, see itscale.rewards.verifier), 'judge' "
                           "(any chat model asked whether the latest step is correct: p(yes)/(p(yes)+p(no)), see "
                           "itscale.rewards.judge) or 'confidence' (a causal LM's own confidence in the solution, "
                           "normally the policy's model: see itscale.rewards.confidence)")
    max_batch: int = Field(128, ge=1, description="local model: sequences scored together")
    step_tag: str | None = Field(None, description="the one-token mark after each step: a tag PRM's tag (default "
                                                   "§, the embedded PRM's; Math-Shepherd: ки), a classifier's "
                                                   "separator (default <extra_0>, Qwen2.5-Math-PRM's)")
    good_token: str = Field("+", min_length=1, description="tag PRM: the token that means 'this step is right' "
                                                         "(judge: the yes word, default Yes)")
    bad_token: str = Field("-", min_length=1, description="tag PRM: the token that means 'this step is wrong' "
                                                        "(judge: the no word, default No)")
    positive_label: int = Field(1, ge=0, description="classifier PRM: the label whose probability is the score")
    template: str | None = Field(None, description="judge: the question about a step, a str.format template with "
                                                   "{question}, {previous_steps} and {step}, or a file holding it "
                                                   "(default: itscale.rewards.judge.DEFAULT_TEMPLATE)")
    measure: Measure = Field(
        "self-certainty", description="confidence: self-certainty (mean KL from uniform of the next-token "
                                      "distributions; Kang et al. 2025) or mean-logprob (mean token log-probability)")

    @model_validator(mode="after")
    def _a_verifier_is_a_function(self) -> "PRMSpec":
        function = isinstance(self.model, str) and is_callable_reference(self.model)
        if self.kind == "verifier" and not function:
            raise ValueError("model: a verifier is a Python function: give it as module.path:function")
        if function and self.kind != "verifier":
            raise ValueError(f"kind: {self.model!r} names a Python function; set kind: verifier")
        if self.template is not None:
            if self.kind != "judge":
                raise ValueError("template: only a judge (kind: judge) reads a template")
            from ..rewards.judge import load_template

            load_template(self.template)  # a bad template is an error now, not at the first step
        if "measure" in self.model_fields_set and self.kind != "confidence":
            raise ValueError("measure: only kind: confidence has a measure")
        if self.kind == "confidence" and self.is_http:
            raise ValueError("kind: confidence reads the model's logits over every token: give a local folder or "
                             ".gguf file (an HTTP model can be a judge)")
        return self

    @property
    def answer_words(self) -> tuple[str, str]:
        """A judge's yes and no words: the good and bad tokens when set, else Yes and No."""
        set_ = self.model_fields_set
        return (self.good_token if "good_token" in set_ else "Yes", self.bad_token if "bad_token" in set_ else "No")

    @property
    def enabled(self) -> bool:
        return not (isinstance(self.model, str) and self.model.lower() == "none")

"""Specs into backends: the one way bench, serve and Python load a policy or a reward model.

:func:`load_policy` and :func:`load_prm` take a :class:`~itscale.backends.spec.PolicySpec` /
:class:`~itscale.backends.spec.PRMSpec` (or its fields as keywords) and return an object
that implements :class:`itscale.protocols.Generator` / :class:`~itscale.protocols.ProcessRewardModel`:

=====================  ===========================================  ==========================================
``model``              policy                                       reward model (``kind``)
=====================  ===========================================  ==========================================
``embedded``, folder,  :class:`~itscale.lm.hf.HFGenerator`          ``tag``: :class:`~itscale.rewards.hf.HFTagPRM`;
``.gguf`` file         on ``device`` in ``dtype``                   ``classifier``: ``HFClassifierPRM``;
                                                                    ``judge``: ``HFJudgePRM``;
                                                                    ``confidence``: ``HFConfidencePRM``
URL(s)                 :class:`~itscale.lm.openai.OpenAIGenerator`  ``tag``: :class:`~itscale.rewards.remote.RemoteTagPRM`;
                       (wrapped in :class:`~itscale.lm.lookahead.   ``classifier``: ``RemoteRewardPRM``
                       Lookahead` when ``kv_block`` is set)         (vLLM's ``/pooling``);
                                                                    ``judge``: ``RemoteJudgePRM``
=====================  ===========================================  ==========================================

torch and transformers are imported only when a local model is loaded (an HTTP-only
server never imports them). A URL is checked here, before any work starts: an
unreachable server, or one that does not serve the model, is an error naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .spec import PolicySpec, PRMSpec

__all__ = ["check_placement", "describe", "load_policy", "load_prm", "served_model"]


def load_policy(spec: PolicySpec | str | None = None, /, *, where: str = "policy", **fields: Any):
    """The policy backend ``spec`` names (a spec, a model string, or ``None`` for the embedded
    policy; ``fields`` override the spec's). ``where`` names the spec in error messages (``policy``
    for a config file's section, ``--policy`` for a command-line flag)."""
    spec = _spec(PolicySpec, spec, fields)
    from .. import zoo

    if spec.is_http:
        from ..lm.openai import OpenAIGenerator

        name, entry = _served(spec.urls, spec.served_model, _setting(where, "model"))
        policy = OpenAIGenerator(spec.urls, name, tokenizer=_tokenizer(spec, name, zoo.policy_path()),
                                 merge_prompts=spec.merge_prompts, **_http(spec, where))
        if isinstance(entry.get("max_model_len"), int):  # vLLM lists its context length
            policy.client.context_length = entry["max_model_len"]
        if spec.kv_block is not None:
            from ..lm.lookahead import Lookahead

            return Lookahead(policy, spec.kv_block)
        return policy
    from ..lm import HFGenerator

    check_placement(spec, where)
    _threads(spec.threads)
    return HFGenerator.from_pretrained(spec.local_path(zoo.policy_path()), tokenizer=_local_tokenizer(spec),
                                       device=spec.device, dtype=spec.dtype, max_batch=spec.max_batch)


def load_prm(spec: PRMSpec | str | None = None, /, *, delimiter: str = "\n", where: str = "prm", **fields: Any):
    """The reward model ``spec`` names, or ``None`` for ``model: none``. ``delimiter`` is the
    policy's step delimiter (removed from each step before the PRM reads it)."""
    spec = _spec(PRMSpec, spec, fields)
    if not spec.enabled:
        return None
    if spec.kind == "verifier":
        from ..rewards.verifier import CallablePRM

        try:
            return CallablePRM.from_reference(str(spec.model))
        except ValueError as err:
            raise ValueError(f"{_setting(where, 'model')}: {err}") from None
    from .. import zoo

    if spec.is_http:
        from ..rewards.remote import RemoteJudgePRM, RemoteRewardPRM, RemoteTagPRM

        name = served_model(spec.urls, spec.served_model, _setting(where, "model"))
        common = dict(tokenizer=_tokenizer(spec, name, zoo.prm_path()), delimiter=delimiter, **_http(spec, where),
                      **_reading(spec))
        if spec.kind == "tag":
            return RemoteTagPRM(spec.urls, name, merge_prompts=spec.merge_prompts, **common)
        if spec.kind == "judge":
            return _named(where, lambda: RemoteJudgePRM(spec.urls, name, merge_prompts=spec.merge_prompts, **common))
        return RemoteRewardPRM(spec.urls, name, **common)
    from ..rewards import HFClassifierPRM, HFConfidencePRM, HFJudgePRM, HFTagPRM

    check_placement(spec, where)
    kinds = {"tag": HFTagPRM, "classifier": HFClassifierPRM, "judge": HFJudgePRM, "confidence": HFConfidencePRM}
    cls = kinds[spec.kind]
    # the embedded model of a confidence PRM is the policy: its own confidence
    path = spec.local_path(zoo.policy_path() if spec.kind == "confidence" else zoo.prm_path())
    options = {} if spec.kind == "confidence" else {"delimiter": delimiter}
    return _named(where, lambda: cls.from_pretrained(path, tokenizer=_local_tokenizer(spec), device=spec.device,
                                                     dtype=spec.dtype, max_batch=spec.max_batch, **options,
                                                     **_reading(spec)))


def check_placement(spec: PolicySpec | PRMSpec, where: str = "policy") -> None:
    """For a local model: ValueError naming the setting when its ``device`` is not present here
    (a CUDA device without CUDA, …). Imports torch; a URL or ``none`` is not checked."""
    if spec.is_http or (isinstance(spec, PRMSpec) and (not spec.enabled or spec.kind == "verifier")):
        return
    from ..lm.loading import resolve_device

    try:
        resolve_device(spec.device)
    except ValueError as err:
        raise ValueError(f"{_setting(where, 'device')}: {err}") from None


def describe(spec: PolicySpec | PRMSpec, backend: Any) -> str:
    """One line for reports: the folder, or the URL(s) and the served name."""
    if isinstance(spec, PRMSpec) and spec.kind == "verifier":
        return f"{spec.model} (a Python verifier)"
    if spec.is_http:
        return f"{', '.join(spec.urls)} ({backend.model})"  # (every HTTP backend names its served model)
    from .. import zoo

    embedded = zoo.policy_path() if isinstance(spec, PolicySpec) else zoo.prm_path()
    return str(spec.local_path(embedded))


def served_model(urls: str | list[str], wanted: str | None, field: str) -> str:
    """The model id to request: ``wanted`` if every server serves it, else the one model they serve."""
    return _served(urls, wanted, field)[0]


def _served(urls: str | list[str], wanted: str | None, field: str) -> tuple[str, dict]:
    """:func:`served_model`, and the model's entry in the first server's list (vLLM's has ``max_model_len``)."""
    import httpx

    from ..lm.http import normalize_base_url

    chosen: tuple[str, dict] | None = None
    for url in [urls] if isinstance(urls, str) else urls:
        base = normalize_base_url(url)
        try:
            reply = httpx.get(base + "/models", timeout=10.0)
            reply.raise_for_status()
            entries = {m["id"]: m for m in reply.json().get("data", [])}
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{field}: cannot list the models of {base} ({type(err).__name__}: {err}); "
                             "is the server running?") from None
        ids = list(entries)
        if wanted is not None and wanted not in ids:
            raise ValueError(f"{field}: {base} does not serve {wanted!r}; it serves {ids}")
        if wanted is None and len(ids) != 1:
            raise ValueError(f"{field}: {base} serves {ids}; set served_model to choose one")
        name = wanted or ids[0]
        if chosen is not None and name != chosen[0]:
            raise ValueError(f"{field}: the servers serve different models ({chosen[0]!r}, {name!r}); set served_model")
        chosen = chosen or (name, entries[name])
    assert chosen is not None
    return chosen


# -- helpers --------------------------------------------------------------------------------
def _spec(cls, spec, fields: dict):
    if spec is None or isinstance(spec, (str, list)):
        return cls(**({"model": spec} if spec is not None else {}), **fields)
    if not isinstance(spec, cls):
        raise TypeError(f"expected a {cls.__name__} or a model string, got {type(spec).__name__}")
    return type(spec)(**{**spec.model_dump(exclude_unset=True), **fields}) if fields else spec


def _named(where: str, make):
    """``make()``, with a ValueError about the judge's words or template named as a setting."""
    try:
        return make()
    except ValueError as err:
        message = str(err)
        for field, start in (("template", "template: "), ("good_token", "yes "), ("bad_token", "no ")):
            if message.startswith(start):
                raise ValueError(f"{_setting(where, field)}: {message.removeprefix('template: ')}") from None
        raise


def _reading(spec: PRMSpec) -> dict[str, Any]:
    """How the PRM reads a solution: the tag format (tag PRM), the separator and label (classifier),
    the question and answer words (judge) or the measure (confidence)."""
    if spec.kind == "judge":
        yes, no = spec.answer_words
        return {"template": spec.template, "yes": yes, "no": no}
    if spec.kind == "confidence":
        return {"measure": spec.measure}
    if spec.kind == "tag":
        from ..rewards.formats import EMBEDDED_TAG_FORMAT, TagFormat

        tag = spec.step_tag or EMBEDDED_TAG_FORMAT.tag
        return {"format": TagFormat(tag=tag, good=spec.good_token, bad=spec.bad_token,
                                    separator=EMBEDDED_TAG_FORMAT.separator)}
    return {"separator_token": spec.step_tag or "<extra_0>", "positive_label": spec.positive_label}


def _setting(where: str, field: str) -> str:
    """A setting's name in errors: ``policy.model`` in a config file; ``--policy`` on the command line."""
    if where.startswith("--"):
        return where if field == "model" else f"{where}-{field.replace('_', '-')}"
    return f"{where}.{field}"


def _http(spec, where: str) -> dict[str, Any]:
    key = None
    if spec.api_key_env:
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise ValueError(f"{_setting(where, 'api_key_env')}: the environment variable {spec.api_key_env} "
                             "is not set")
    return {"api_key": key, "timeout": spec.timeout, "retries": spec.retries, "max_concurrency": spec.max_concurrency}


def _tokenizer(spec, name: str, embedded: Path) -> str | None:
    """For a URL: the tokenizer folder given, else the served name when it is a local folder."""
    if spec.tokenizer:
        return str(embedded if spec.tokenizer == "embedded" else Path(spec.tokenizer).expanduser())
    return name if Path(name).is_dir() else None


def _local_tokenizer(spec):
    if not spec.tokenizer:
        return None
    from ..lm.loading import load_tokenizer

    return load_tokenizer(Path(spec.tokenizer).expanduser())


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)

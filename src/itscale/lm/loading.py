"""Loading local Hugging Face model folders, with errors that say what is wrong.

A model folder is what ``save_pretrained`` writes: ``config.json``, the weights
(``model.safetensors`` or ``pytorch_model.bin``, possibly sharded with an index) and
the tokenizer files (``tokenizer.json`` / ``tokenizer_config.json``). Every failure
— a missing folder, a missing or corrupt ``config.json``, no weights, no tokenizer,
weights that do not fit the architecture — raises :class:`ModelLoadError`, which
names the folder and the cause.

This module imports torch and transformers lazily, so ``itscale.lm`` can be
imported (and :class:`ModelLoadError` caught) without the ``hf`` extra installed.
"""

from __future__ import annotations

import inspect
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ModelLoadError(ValueError):
    """A model folder could not be loaded; ``path`` is the folder, ``cause`` says why."""

    def __init__(self, path: str | Path, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"cannot load model from {self.path!r}: {cause}")


def check_model_dir(path: str | Path, need_tokenizer: bool = True) -> Path:
    """The folder as a ``Path`` after checking the files a model needs; else ModelLoadError."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(folder, "no such directory")
    if not folder.is_dir():
        raise ModelLoadError(folder, "not a directory (pass the model folder, not a file)")
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(folder, "config.json is missing (not a Hugging Face model folder)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(folder, f"config.json is corrupt: {err}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelLoadError(folder, "config.json is corrupt: expected a JSON object with a 'model_type' field")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(folder, f"no weights found (expected one of: {', '.join(WEIGHT_FILES)})")
    if need_tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(folder, f"no tokenizer found (expected one of: {', '.join(TOKENIZER_FILES)})")
    return folder


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure becomes a typed error naming the folder
        raise ModelLoadError(folder, f"the tokenizer failed to load: {type(err).__name__}: {err}") from err


def load_model(folder: Path, kind: str, device: Any = "cpu", dtype: Any = None, **kwargs: Any):
    """``kind`` is ``causal_lm`` or ``token_classification``; the model is in eval mode on ``device``."""
    import torch
    import transformers

    auto = {
        "causal_lm": transformers.AutoModelForCausalLM,
        "token_classification": transformers.AutoModelForTokenClassification,
    }[kind]
    try:
        model, info = auto.from_pretrained(
            str(folder), local_files_only=True, dtype=dtype or torch.float32, output_loading_info=True, **kwargs
        )
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(folder, f"the weights failed to load: {type(err).__name__}: {err}") from err
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ModelLoadError(folder, f"the weights do not match the architecture: {len(missing)} missing tensors ({shown})")
    return model.to(device).eval()


def count_parameters(model) -> int:
    """Parameters of a torch module, each shared (tied) tensor counted once."""
    return int(sum(p.numel() for p in model.parameters()))


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> tuple[str, bool]:
    """The text a chat model reads before its answer, and whether tokenizing it adds special tokens.

    With a chat template: ``apply_chat_template([system?, user], add_generation_prompt=True)``
    (the template writes any BOS itself, so no special tokens are added). Without one: the
    raw prompt, tokenized with the tokenizer's own special tokens (e.g. BOS).
    """
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text), False
    return (f"{system}\n\n{prompt}" if system else prompt), True


class ChatPrompts:
    """:func:`chat_prompt` memoised per problem prompt (at most ``limit`` entries, then reset):
    every request of a problem reads the same chat prompt."""

    def __init__(self, tokenizer, system: str | None = None, limit: int = 4096):
        self.tokenizer, self.system, self.limit = tokenizer, system, limit
        self._memo: dict[str, tuple[str, bool]] = {}

    def __call__(self, prompt: str) -> tuple[str, bool]:
        hit = self._memo.get(prompt)
        if hit is None:
            if len(self._memo) >= self.limit:
                self._memo.clear()
            hit = self._memo[prompt] = chat_prompt(self.tokenizer, prompt, self.system)
        return hit


def encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens)) if text else []


def single_token_id(tokenizer, text: str, what: str) -> int:
    """The id of ``text`` when it is exactly one token, else ValueError naming ``what``."""
    ids = encode(tokenizer, text)
    if len(ids) != 1:
        raise ValueError(f"{what} {text!r} must be a single token of this tokenizer, got ids {ids}")
    return ids[0]


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """End-of-sequence ids: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


@lru_cache(maxsize=64)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(model) -> str:
    """The keyword the model's forward takes its KV cache under (``cache`` since transformers 5.2x)."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def accepts(model, name: str) -> bool:
    return name in _forward_params(type(model))


def check_full_attention(model) -> None:
    """KV reuse here assumes every layer is plain full attention (Llama, Qwen2, Mistral without window…)."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    types = getattr(config, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        raise ValueError(
            f"{type(model).__name__} has layer types {sorted(set(types))}; itscale's KV-cache reuse supports "
            "full-attention decoder layers only (pass reuse_cache=False?)"
        )
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise ValueError(f"{type(model).__name__} uses sliding-window attention, which KV-cache reuse does not support")

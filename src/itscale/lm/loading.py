"""Loading a Hugging Face model for any itscale backend, with errors that say what is wrong.

:func:`load_hf` is the one loading path of :class:`~itscale.lm.hf.HFGenerator`,
:class:`~itscale.rewards.hf.HFTagPRM` and :class:`~itscale.rewards.hf.HFClassifierPRM`.
It takes

- a model *folder*, as ``save_pretrained`` writes it: ``config.json``, the weights
  (``model.safetensors`` or ``pytorch_model.bin``, possibly sharded with an index) and
  the tokenizer files (``tokenizer.json`` / ``tokenizer_config.json``);
- a ``.gguf`` *file* (llama.cpp's format): model and tokenizer (with its chat template)
  are read from the file by transformers, which needs the ``gguf`` package;
- or a model *object* (then a tokenizer must be given), moved to the device.

Every failure to load — a missing folder or file, a missing or corrupt ``config.json``,
no weights, no tokenizer, weights that do not fit the architecture, a missing ``gguf``
package — raises :class:`ModelLoadError`, which names the path and the cause.

Device and dtype (:func:`resolve_device`, :func:`resolve_dtype`): ``"auto"`` is CUDA
when torch sees it, else Apple's MPS, else the CPU; the dtype ``"auto"`` is the
checkpoint's stored dtype on CUDA/MPS when that is 16-bit, and float32 otherwise (16-bit
matmuls are slow on CPUs, and float32 is what the embedded models were checked with);
for a model object ``"auto"`` keeps the object's dtype.

This module imports torch and transformers lazily, so ``itscale.lm`` can be
imported (and :class:`ModelLoadError` caught) without the ``hf`` extra installed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ModelLoadError(ValueError):
    """A model could not be loaded; ``path`` is the folder or file, ``cause`` says why."""

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
        raise ModelLoadError(folder, "not a directory (pass the model folder, or a .gguf file)")
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


# -- device and dtype -------------------------------------------------------------------
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_NAME = re.compile(r"cpu|cuda(:\d+)?|mps(:0)?")


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The devices torch can use here: ``cpu``, then ``cuda:0`` … and ``mps`` when present."""
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        out.append("mps")
    return out


def resolve_device(name: Any = "auto") -> "torch.device":
    """``name`` as a ``torch.device``, checked to be usable here.

    ``name`` is a ``torch.device`` or one of ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``
    (None means ``auto``). ``auto`` is CUDA when ``torch.cuda.is_available()``, else MPS
    when available, else the CPU. A CUDA or MPS device torch cannot use: ValueError
    naming it and the devices that are available; an unknown name: ValueError listing
    the choices.
    """
    import torch

    if name is None:
        name = "auto"
    if isinstance(name, str):
        text = name.strip().lower()
        if text == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            return torch.device("mps" if _mps_available() else "cpu")
        if not _DEVICE_NAME.fullmatch(text):
            raise ValueError(f"device {name!r} is not one of: {', '.join(DEVICE_CHOICES)} (or a torch.device)")
        device = torch.device(text)
    elif isinstance(name, torch.device):
        device = name
    else:
        raise ValueError(f"device {name!r} is not one of: {', '.join(DEVICE_CHOICES)} (or a torch.device)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            why = "this torch build has no CUDA support" if torch.version.cuda is None else f"torch sees {count} CUDA devices"
            raise ValueError(f"device {str(name)!r} is not available ({why}); available: {', '.join(available_devices())}")
    elif device.type == "mps" and not _mps_available():
        raise ValueError(f"device {str(name)!r} is not available (torch sees no MPS device); "
                         f"available: {', '.join(available_devices())}")
    return device


def _as_dtype(value: Any) -> "torch.dtype | None":
    """A checkpoint's stored dtype (``"bfloat16"``, ``"torch.float16"``, a torch.dtype) as a torch.dtype, or None."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    found = getattr(torch, str(value).removeprefix("torch."), None)
    return found if isinstance(found, torch.dtype) else None


def resolve_dtype(name: Any = "auto", device: Any = "cpu", checkpoint_dtype: Any = None) -> "torch.dtype":
    """The dtype to load weights in.

    ``name`` is a ``torch.dtype`` or one of ``auto``, ``float32``, ``bfloat16``, ``float16``
    (None means ``auto``); anything else: ValueError listing the choices. ``auto`` is
    ``checkpoint_dtype`` (the config's ``dtype``/``torch_dtype``, e.g. ``"bfloat16"``) when
    ``device`` is CUDA or MPS and that dtype is 16-bit, else float32. ``device`` is a
    ``torch.device`` or a name (``auto`` is resolved with :func:`resolve_device`; other
    names are not checked for availability here).
    """
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name is None:
        name = "auto"
    if not isinstance(name, str) or name not in DTYPE_CHOICES:
        raise ValueError(f"dtype {name!r} is not one of: {', '.join(DTYPE_CHOICES)} (or a torch.dtype)")
    if name != "auto":
        return getattr(torch, name)
    if not isinstance(device, torch.device):
        device = resolve_device(device) if device in (None, "auto") else torch.device(device)
    stored = _as_dtype(checkpoint_dtype)
    if device.type in ("cuda", "mps") and stored in (torch.bfloat16, torch.float16):
        return stored
    return torch.float32


def _is_auto(dtype: Any) -> bool:
    return dtype is None or (isinstance(dtype, str) and dtype == "auto")


def config_dtype(folder: Path) -> str | None:
    """The dtype a model folder's ``config.json`` says its weights are stored in (``dtype``/``torch_dtype``)."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    value = data.get("dtype") or data.get("torch_dtype") if isinstance(data, dict) else None
    return str(value) if value else None


# -- loading ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    """What :func:`load_hf` returns: the model (eval mode, on ``device``), its tokenizer, where and in what dtype."""

    model: Any
    tokenizer: Any
    device: "torch.device"
    dtype: "torch.dtype"


def _has_package(name: str) -> bool:
    return find_spec(name) is not None


def is_gguf_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a ``.gguf`` file (a path ending in ``.gguf`` that is not a folder)."""
    p = Path(path).expanduser()
    return p.suffix.lower() == ".gguf" and not p.is_dir()


def _check_gguf(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(path, "no such file")
    if not path.is_file():
        raise ModelLoadError(path, "not a file")
    missing = [pkg for pkg in ("gguf", "accelerate") if not _has_package(pkg)]
    if missing:
        raise ModelLoadError(path, f"reading a .gguf file needs the Python package{'s' * (len(missing) > 1)} "
                                   f"{' and '.join(missing)}: pip install {' '.join(missing)}")


def load_tokenizer(folder: Path, gguf_file: str | None = None):
    """The tokenizer of a model folder, or (``gguf_file``: a file name in ``folder``) of a .gguf file."""
    from transformers import AutoTokenizer

    where = folder / gguf_file if gguf_file else folder
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
    except Exception as err:  # noqa: BLE001 - any failure becomes a typed error naming the folder
        raise ModelLoadError(where, f"the tokenizer failed to load: {type(err).__name__}: {err}") from err


def _gguf_dtype(path: Path) -> str | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(path, f"the config failed to load: {type(err).__name__}: {err}") from err
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(value) if value else None


def _from_pretrained(folder: Path, kind: str, device, dtype, gguf_file: str | None = None):
    """The weights of ``folder`` (or of the file ``gguf_file`` in it) as a ``kind`` model, in eval mode on ``device``."""
    import transformers

    where = folder / gguf_file if gguf_file else folder
    auto = {
        "causal_lm": transformers.AutoModelForCausalLM,
        "token_classification": transformers.AutoModelForTokenClassification,
    }[kind]
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model, info = auto.from_pretrained(str(folder), local_files_only=True, dtype=dtype,
                                           output_loading_info=True, **extra)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(where, f"the weights failed to load: {type(err).__name__}: {err}") from err
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ModelLoadError(where, f"the weights do not match the architecture: {len(missing)} missing tensors ({shown})")
    return model.to(device).eval()


def _model_dtype(model) -> "torch.dtype":
    import torch

    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters()), torch.float32)


def load_hf(path_or_model: Any, tokenizer: Any = None, kind: str = "causal_lm", device: Any = "auto",
            dtype: Any = "auto", *, owner: str = "the backend") -> LoadedModel:
    """Load a model for a Hugging Face backend (see the module docstring).

    ``path_or_model``: a model folder, a ``.gguf`` file, or a model object (then
    ``tokenizer`` is required; ValueError naming ``owner`` otherwise). ``tokenizer``, when
    given, replaces the folder's or file's own. ``kind``: ``causal_lm`` or
    ``token_classification``. ``device``/``dtype``: see :func:`resolve_device` and
    :func:`resolve_dtype` (for a model object ``dtype="auto"`` keeps its dtype). Loading
    failures raise :class:`ModelLoadError`.
    """
    if kind not in ("causal_lm", "token_classification"):
        raise ValueError(f"kind must be 'causal_lm' or 'token_classification', got {kind!r}")
    if not isinstance(path_or_model, (str, os.PathLike)):
        if tokenizer is None:
            raise ValueError(f"{owner}(model_object) needs tokenizer=...")
        device = resolve_device(device)
        if _is_auto(dtype):
            model = path_or_model.to(device)
        else:
            model = path_or_model.to(device=device, dtype=resolve_dtype(dtype, device))
        model.eval()
        return LoadedModel(model, tokenizer, device, _model_dtype(model))
    path = Path(path_or_model).expanduser()
    if is_gguf_file(path):
        _check_gguf(path)
        folder, gguf_file = path.parent, path.name
    else:
        folder, gguf_file = check_model_dir(path, need_tokenizer=tokenizer is None), None
    device = resolve_device(device)
    stored = None
    if _is_auto(dtype) and device.type != "cpu":  # the stored dtype matters only off the CPU
        stored = _gguf_dtype(path) if gguf_file else config_dtype(folder)
    dtype = resolve_dtype(dtype, device, stored)
    if tokenizer is None:
        tokenizer = load_tokenizer(folder, gguf_file)
    model = _from_pretrained(folder, kind, device, dtype, gguf_file)
    return LoadedModel(model, tokenizer, device, _model_dtype(model))


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

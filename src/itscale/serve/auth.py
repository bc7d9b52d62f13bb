"""API keys: where they come from, their limits, and the constant-time check.

Keys come from any of

- ``--api-key KEY`` (repeatable; visible in ``ps``, so prefer the file or the environment),
- ``ITSCALE_API_KEYS``: keys separated by commas or whitespace,
- ``--api-key-file FILE``: one key per line, optionally followed by its limits::

      # key                              settings (all optional)
      sk-alice-8f3b2c1d9e7a              name=alice max_budget=64 max_tokens=1024
      sk-batch-0c4d5e6f7a8b              name=batch max_budget=256 max_running=4
      sk-plain-1a2b3c4d5e6f

  Blank lines and ``#`` comments are ignored. ``name`` labels the key in logs (the
  key itself is never logged); ``max_budget``, ``max_tokens`` and ``max_running``
  are the key's :class:`~itscale.serve.config.Limits` and replace the server's for
  that key. Keys from the flag and the environment get the server's limits.

A request authenticates with ``Authorization: Bearer KEY``. :meth:`KeyRing.match`
compares the SHA-256 digest of the presented key with every stored digest using
:func:`hmac.compare_digest`, always all of them, so neither the time nor the
position of a match depends on how much of a key was right.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pydantic import ValidationError

from .config import Limits

ENV_VAR = "ITSCALE_API_KEYS"
MIN_KEY_LENGTH = 8
_SETTINGS = ("name", "max_budget", "max_tokens", "max_running")
_COMMENT = re.compile(r"(^|\s)#.*$")  # a '#' that starts a word starts a comment


class KeyFileError(ValueError):
    """A malformed key file; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class ApiKey:
    """A stored key: its digest (never the key), a display name and its limits."""

    name: str
    digest: bytes
    limits: Limits


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _check_key(key: str, where: str) -> None:
    if len(key) < MIN_KEY_LENGTH:
        raise KeyFileError(f"{where}: an API key must have at least {MIN_KEY_LENGTH} characters "
                           "(generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")


def parse_key_file(text: str, source: str, default: Limits) -> list[ApiKey]:
    """The keys of a key file's text (format in the module docstring)."""
    keys: list[ApiKey] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        key, *settings = line.split()
        _check_key(key, where)
        values: dict[str, str] = {}
        for item in settings:
            name, sep, value = item.partition("=")
            if not sep or name not in _SETTINGS or not value:
                raise KeyFileError(f"{where}: expected NAME=VALUE with NAME one of {', '.join(_SETTINGS)}, "
                                   f"got {item!r}")
            values[name] = value
        label = values.pop("name", f"key{len(keys) + 1}")
        try:
            limits = Limits(**{**default.model_dump(), **values})
        except ValidationError as err:
            e = err.errors()[0]
            raise KeyFileError(f"{where}: {e['loc'][0]}: {e['msg']}") from None
        keys.append(ApiKey(label, _digest(key), limits))
    return keys


def load_key_file(path: str | os.PathLike, default: Limits) -> list[ApiKey]:
    """The keys of a key file. Raises :class:`KeyFileError` for a missing or bad file."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as err:
        raise KeyFileError(f"--api-key-file: cannot read {p}: {err.strerror or err}") from None
    return parse_key_file(text, str(p), default)


def key_file_warning(path: str | os.PathLike) -> str | None:
    """A warning when the key file can be read by other users (like ssh's check)."""
    try:
        mode = Path(path).expanduser().stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return f"API key file {path} is readable by other users; run `chmod 600 {path}`"
    return None


def plain_keys(keys: Iterable[str], source: str, default: Limits) -> list[ApiKey]:
    """Keys without settings (from ``--api-key`` or the environment), with the server's limits."""
    out = []
    for i, key in enumerate(keys, 1):
        _check_key(key, f"{source} (key {i})")
        out.append(ApiKey(f"{source.lstrip('-').lower()}{i}", _digest(key), default))
    return out


def env_keys(default: Limits, environ: dict[str, str] | None = None) -> list[ApiKey]:
    value = (environ if environ is not None else os.environ).get(ENV_VAR, "")
    return plain_keys([k for k in re.split(r"[\s,]+", value) if k], ENV_VAR, default)


class KeyRing:
    """The accepted keys. Empty means the server is open (no authentication)."""

    def __init__(self, keys: Iterable[ApiKey] = ()):
        self.keys = list(keys)

    @property
    def open(self) -> bool:
        return not self.keys

    def match(self, presented: str) -> ApiKey | None:
        """The stored key equal to ``presented``, compared in constant time."""
        digest = _digest(presented)
        found = None
        for key in self.keys:  # no early exit
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    @staticmethod
    def bearer(header: str | None) -> str | None:
        """The token of an ``Authorization: Bearer TOKEN`` header, else ``None``."""
        if not header:
            return None
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None

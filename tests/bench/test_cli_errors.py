"""Bad command-line values end in a one-line error naming the field, never silently ignored
and never a traceback (the real ``itscale`` entry point in a subprocess)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from itscale.bench.table import format_accuracy
from itscale.stats import wilson


def itscale(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "itscale.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text("problems: {source: 'arithmetic:easy', limit: 2}\nmethods: [{name: greedy}]\n"
                    f"output: {tmp_path / 'out'}\n")
    return path


@pytest.mark.parametrize("option, field", [("--limit", "problems.limit"), ("--concurrency", "concurrency")])
def test_a_zero_on_the_command_line_is_refused_like_in_the_file(config, tmp_path, option, field):
    done = itscale("bench", str(config), option, "0", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert field in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


def test_demo_with_no_problems_is_refused_without_a_traceback(tmp_path):
    done = itscale("demo", "--problems", "0", "--output", str(tmp_path / "demo"), cwd=tmp_path)
    assert done.returncode == 2
    assert "problems.limit" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("n", [5, 10, 19, 23])  # sizes where the textbook formula rounds past 0 or 1
def test_intervals_never_print_past_0_or_100_percent(n):
    for p in (0.0, 1.0):
        low, high = wilson(p, n)
        assert 0.0 <= low <= p <= high <= 1.0
    assert "-0.0" not in format_accuracy(type("Row", (), {"accuracy": 0.0, "ci_low": wilson(0.0, n)[0],
                                                          "ci_high": wilson(0.0, n)[1]})())


def test_an_output_that_is_a_file_is_refused_naming_the_field(config, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    done = itscale("bench", str(config), "--output", str(tmp_path / "taken"), cwd=tmp_path)
    assert done.returncode == 2
    assert "output" in done.stderr and "is a file" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_the_cli_has_a_version_and_runs_as_a_module(tmp_path):
    from itscale import __version__

    done = subprocess.run([sys.executable, "-m", "itscale", "--version"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"itscale {__version__}"
    usage = subprocess.run([sys.executable, "-m", "itscale", "--help"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60).stdout
    assert "{zoo,bench,demo,serve,solve}" in usage


@pytest.mark.parametrize("section, field", [("problems: {source: missing.jsonl}", "problems.source"),
                                            ("policy: {model: no-such-folder}", "policy.model"),
                                            ("prm: {model: no-such-folder}", "prm.model")])
def test_missing_files_and_folders_are_named_by_their_field_before_any_output(tmp_path, section, field):
    path = tmp_path / "bench.yaml"
    path.write_text(f"{section}\nmethods: [{{name: greedy}}]\noutput: {tmp_path / 'out'}\n")
    done = itscale("bench", str(path), cwd=tmp_path)
    assert done.returncode == 2 and f"{field}: " in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_config_path_that_is_a_folder_is_called_a_folder(tmp_path):
    done = itscale("bench", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and "is a folder" in done.stderr


class RefusingServer:
    """A real OpenAI-compatible HTTP server on loopback that lists one model and answers every
    completion with 400 and its own message (what a server does with requests it will not serve)."""

    MESSAGE = "this deployment refuses completions (test server)"

    def __enter__(self):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        message = self.MESSAGE
        self.posts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply(200, {"object": "list", "data": [{"id": "policy", "object": "model"}]})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts += 1
                self._reply(400, {"error": {"message": message, "type": "invalid_request_error"}})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_policy_server_that_refuses_every_call_is_an_error_with_its_message_not_a_bad_model(tmp_path):
    pytest.importorskip("httpx")
    pytest.importorskip("transformers")
    with RefusingServer() as server:
        path = tmp_path / "bench.yaml"
        path.write_text(f"problems: {{source: 'arithmetic:easy', limit: 2}}\n"
                        f"policy: {{model: '{server.url}', tokenizer: embedded}}\nprm: {{model: none}}\n"
                        "methods: [{name: greedy}, {name: self_consistency}, {name: adaptive_self_consistency}]\n"
                        f"budgets: [1, 2]\noutput: {tmp_path / 'out'}\n")
        done = itscale("bench", str(path), cwd=tmp_path)
    assert server.posts > 0
    assert done.returncode == 1, done.stdout + done.stderr
    shown = " ".join(done.stdout.split())  # (rich wraps long lines)
    assert f"HTTP 400: {RefusingServer.MESSAGE}" in shown and "10 of 10 results are errors" in shown, done.stdout
    assert "every result is an error" in done.stderr and "Traceback" not in done.stderr
    import csv

    with open(tmp_path / "out" / "records.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["status"] == "error" and RefusingServer.MESSAGE in r["message"] for r in rows), rows[:2]


def test_a_problem_file_gets_the_embedded_policys_template_and_a_misfit_is_said(tmp_path):
    """Five arithmetic problems in a file: with the embedded policy they are asked as the task's bare
    prompts (its template), and a template or problems it was not trained on are warned about."""
    import json

    from itscale.tasks import arithmetic

    rows = [{"id": p.id, "problem": p.prompt, "answer": p.answer} for p in arithmetic.eval_set("easy")[:5]]
    rows.append({"id": "france", "problem": "What is the capital of France?", "answer": "Paris"})
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def bench(extra: str, out: str) -> subprocess.CompletedProcess:
        path = tmp_path / f"{out}.yaml"
        path.write_text(f"problems: {{source: '{tmp_path / 'p.jsonl'}'{extra}}}\nprm: {{model: none}}\n"
                        f"methods: [{{name: greedy}}]\noutput: {tmp_path / out}\n")
        return itscale("bench", str(path), cwd=tmp_path)

    plain = bench("", "plain")
    assert plain.returncode == 0, plain.stderr
    said = " ".join(plain.stdout.split())
    assert "problems.source: 1 of 6 problems are not prompts of the arithmetic task" in said and "france" in said
    assert "problems.template" not in said
    boxed = bench(", template: boxed", "boxed")
    assert "problems.template: the embedded policy was trained on the task's bare prompts; template 'boxed'" in \
        " ".join(boxed.stdout.split())
    import csv

    def right(out: str) -> float:
        with open(tmp_path / out / "records.csv") as f:
            return sum(float(r["score"]) for r in csv.DictReader(f) if r["problem_id"] != "france")

    assert (right("plain"), right("boxed")) == (2.0, 0.0)  # measured: greedy gets 2 of the 5 asked plainly

"""``itscale serve`` replicas: stateless answers, replica names in ``/metrics`` and headers.

Two real ``itscale serve`` processes with the embedded models (``replica-a`` named with
``--replica-id``, the other left to its default ``HOSTNAME:PORT``), each spoken to by the
official ``openai`` client:

- a round-robin client (requests alternate between the replicas) sends six seeded
  particle-filtering requests; one replica then answers all six in order and the other all
  six in reverse order. Every answer (text, ``itscale`` block, ``usage``) equals the
  round-robin one: an answer depends on its request and seed only, not on which replica
  served it or on what that replica served before;
- each replica's ``/metrics`` labels every sample with its own name, has
  ``itscale_replica_info{replica=NAME} 1``, parses with the Prometheus text parser, and counts
  the half it answered; each response's ``x-itscale-replica`` header names the replica that
  answered it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from itscale.serve.metrics import parse_samples
from itscale.tasks import arithmetic

from .conftest import ServeProcess

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("serve")]

ROOT = Path(__file__).resolve().parents[2]
PROBLEMS = [p.prompt for p in arithmetic.eval_set("hard")[:6]]
SEEDS = [101, 202, 303, 404, 505, 606]
NAMED = "replica-a"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    logs = tmp_path_factory.mktemp("replica-logs")
    common = ["--request-timeout", "120", "--default-budget", "4"]
    a = ServeProcess("replica-a", common, log_dir=logs, replica=NAMED)
    b = ServeProcess("replica-b", common, log_dir=logs)  # the default name, HOSTNAME:PORT
    for p in (a, b):
        p.start()
    try:
        for p in (a, b):
            p.wait_ready()
        yield a, b
    finally:
        for p in (a, b):
            p.stop()


def ask(client: openai.OpenAI, i: int) -> tuple[str, tuple]:
    """Request ``i`` (its problem and seed): the replica named in the response header, and
    what the answer must not depend on anything but the request for: the text, the itscale
    block (answer, candidates with their weights and scores, cost) and the usage."""
    raw = client.chat.completions.with_raw_response.create(
        model="tiny:pf-4", messages=[{"role": "user", "content": PROBLEMS[i]}], seed=SEEDS[i], max_tokens=96,
        temperature=1.0)
    r = raw.parse()
    block = {k: v for k, v in r.model_extra["itscale"].items() if k != "queued_s"}
    cost = block.pop("cost")
    cost = {k: v for k, v in cost.items() if "seconds" not in k and "time" not in k}  # (wall time varies)
    answer = (r.choices[0].message.content, json.dumps(block, sort_keys=True), json.dumps(cost, sort_keys=True),
              json.dumps(r.usage.model_dump(), sort_keys=True))
    return raw.headers.get("x-itscale-replica"), answer


def prometheus_families(text: str) -> dict[str, str] | None:
    """``{family: type}`` by the official Prometheus text parser (``prometheus_client``, here or in
    ``.venv-vllm``); None when neither has it."""
    code = ("import json, sys\nfrom prometheus_client.parser import text_string_to_metric_families as f\n"
            "print(json.dumps({m.name: m.type for m in f(sys.stdin.read())}))")
    for python in (sys.executable, ROOT / ".venv-vllm" / "bin" / "python"):
        if not Path(python).exists():
            continue
        run = subprocess.run([str(python), "-c", code], input=text, capture_output=True, text=True, timeout=60,
                             check=False)
        if "No module named 'prometheus_client'" in run.stderr:
            continue
        assert run.returncode == 0, f"the Prometheus parser rejects the page:\n{run.stderr[-2000:]}"
        return json.loads(run.stdout)
    return None


def test_replicas_answer_alike_whatever_they_served_before_and_name_themselves(replicas):
    a, b = replicas
    assert a.replica == NAMED
    hostname = socket.gethostname()
    if hostname.isascii() and hostname.isprintable() and " " not in hostname:
        assert b.replica == f"{hostname}:{b.port}"
    with openai.OpenAI(base_url=a.url, api_key="none", max_retries=0, timeout=120) as ca, \
            openai.OpenAI(base_url=b.url, api_key="none", max_retries=0, timeout=120) as cb:
        clients = [(a, ca), (b, cb)]
        # a round-robin client: request i goes to replica i mod 2
        round_robin = []
        for i in range(len(PROBLEMS)):
            server, client = clients[i % 2]
            named, answer = ask(client, i)
            assert named == server.replica, f"request {i} was answered by {server.name}, whose header says {named!r}"
            round_robin.append(answer)
        for server in (a, b):
            m = server.metrics()  # (checks that every itscale_ sample carries server.replica)
            assert m['itscale_requests_total{outcome="ok"}'] == 3, f"{server.name} answered {m}"
            assert m["itscale_request_seconds_count"] == 3 and m["itscale_replica_info"] == 1
        assert len({answer[0] for answer in round_robin}) > 1  # (six different problems, six different texts)

        # one server answering all of them, in order (a) and in reverse order (b)
        in_order = [ask(ca, i)[1] for i in range(len(PROBLEMS))]
        reverse = {i: ask(cb, i)[1] for i in reversed(range(len(PROBLEMS)))}
    for i, expected in enumerate(round_robin):
        assert in_order[i] == expected, f"request {i}: {NAMED} answered differently after serving others"
        assert reverse[i] == expected, f"request {i}: {b.replica} answered differently in reverse order"
    assert a.metrics()['itscale_requests_total{outcome="ok"}'] == 3 + 6
    assert b.metrics()['itscale_requests_total{outcome="ok"}'] == 3 + 6


def test_each_metrics_page_is_valid_prometheus_text_labelled_with_its_replica(replicas):
    for server in replicas:
        response = httpx.get(server.root + "/metrics", timeout=5.0)
        assert response.headers["x-itscale-replica"] == server.replica
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = parse_samples(response.text)
        assert samples and {labels.get("replica") for _, labels, _ in samples} == {server.replica}
        assert ("itscale_replica_info", {"replica": server.replica}, 1.0) in samples
        families = prometheus_families(response.text)
        if families is not None:
            assert families["itscale_replica_info"] == "gauge" and families["itscale_requests"] == "counter"
        # every other route names the replica too, errors included
        for path in ("/health", "/v1/models", "/v1/nowhere"):
            assert httpx.get(server.root + path, timeout=5.0).headers["x-itscale-replica"] == server.replica

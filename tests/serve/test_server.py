"""``itscale serve`` through the official ``openai`` client: endpoints, method selection,
streaming, authentication, validation and limits (embedded models, real server)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from .conftest import ALICE, LOW, PROBLEM, SMALL, SOLO, TIGHT, chat_body

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("serve")]


def test_models_lists_the_base_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_models_reveal_no_path_or_host(client):
    from itscale import zoo

    listed = client.models.with_raw_response.list().text
    one = client.models.with_raw_response.retrieve("tiny").text
    for text in (listed, one):
        assert str(zoo.policy_path()) not in text and "/" not in text
    assert json.loads(one)["root"] == "tiny"


def test_chat_completion_is_an_openai_response_with_the_itscale_block(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROBLEM}], seed=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert "Answer:" in choice.message.content
    block = r.model_extra["itscale"]
    assert block["method"] == "particle_filtering" and block["budget"] == 4  # the server's defaults
    assert block["seed"] == 3 and block["status"] == "ok"
    assert len(block["candidates"]) >= 1 and abs(sum(block["weights"]) - 1) < 1e-9
    assert block["weights"] == [c["weight"] for c in block["candidates"]]
    assert any(c["text"] == choice.message.content for c in block["candidates"])
    cost = block["cost"]
    # usage is the whole search's cost, not the returned text's
    assert r.usage.completion_tokens == cost["generated_tokens"] > len(choice.message.content)
    assert r.usage.prompt_tokens == cost["prompt_tokens"] > 0
    assert r.usage.model_extra["prm_tokens"] == cost["prm_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens + cost["prm_tokens"]
    assert cost["policy_calls"] >= 3  # one per step of the particle filter


def test_completions_endpoint_with_extra_body_method(client):
    r = client.completions.create(model="tiny", prompt=PROBLEM, max_tokens=64, seed=0,
                                  extra_body={"itscale": {"method": "bon", "budget": 6}})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    block = r.model_extra["itscale"]
    assert block["method"] == "best_of_n" and block["budget"] == 6
    assert len(block["candidates"]) == 6 and all(c["score"] is not None for c in block["candidates"])
    assert r.choices[0].text.endswith(f"Answer: {block['answer']}")
    assert block["cost"]["policy_calls"] == 1  # N whole samples in one call


@pytest.mark.parametrize("model, method, budget", [
    ("tiny:pf-8", "particle_filtering", 8),
    ("tiny:wbon-4", "weighted_best_of_n", 4),
    ("tiny:majority-3", "self_consistency", 3),
    ("tiny:beam-4", "beam_search", 4),
    ("tiny:greedy", "greedy", 4),
])
def test_model_suffix_selects_method_and_budget(client, model, method, budget):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROBLEM}], seed=1,
                                       max_tokens=64)
    block = r.model_extra["itscale"]
    assert (block["method"], block["budget"]) == (method, budget)
    assert r.model == model
    if method == "greedy":
        assert r.usage.completion_tokens == len(r.choices[0].message.content) + 1  # character tokens + end


def test_method_params_are_passed_to_the_strategy(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROBLEM}], seed=2,
        extra_body={"itscale": {"method": "beam_search", "budget": 4, "params": {"beam_width": 2}}})
    assert r.model_extra["itscale"]["params"] == {"beam_width": 2}
    assert r.model_extra["itscale"]["cost"]["policy_calls"] >= 3


def test_seed_makes_the_answer_reproducible(client):
    def ask(seed):
        r = client.chat.completions.create(model="tiny:pf-8", messages=[{"role": "user", "content": PROBLEM}],
                                           seed=seed, temperature=1.0)
        return [(c["text"], round(c["weight"], 9)) for c in r.model_extra["itscale"]["candidates"]]

    first = ask(11)
    assert ask(11) == first
    # without a seed the server draws one, reports it, and the report reproduces the run
    r = client.chat.completions.create(model="tiny:pf-8", messages=[{"role": "user", "content": PROBLEM}],
                                       temperature=1.0)
    drawn = r.model_extra["itscale"]["seed"]
    assert ask(drawn) == [(c["text"], round(c["weight"], 9)) for c in r.model_extra["itscale"]["candidates"]]


def test_n_returns_the_top_distinct_candidates(client):
    r = client.chat.completions.create(model="tiny:bon-8", messages=[{"role": "user", "content": PROBLEM}], n=3,
                                       seed=5, temperature=1.2)
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == list(range(len(texts)))
    assert 1 <= len(texts) <= 3 and len(set(texts)) == len(texts)
    block = r.model_extra["itscale"]
    assert texts[0].endswith(f"Answer: {block['answer']}")  # the method's pick comes first
    assert set(texts) <= {c["text"] for c in block["candidates"]}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny:bon-2", messages=[{"role": "user", "content": PROBLEM}], n=3)
    assert err.value.body["param"] == "n"


def test_max_tokens_caps_every_candidate(client):
    r = client.completions.create(model="tiny:greedy", prompt=PROBLEM, max_tokens=8)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and len(r.choices[0].text) == 8  # one character per token
    r = client.completions.create(model="tiny:pf-4", prompt=PROBLEM, max_tokens=12, seed=0)
    block = r.model_extra["itscale"]
    assert all(len(c["text"]) <= 12 for c in block["candidates"])
    assert r.choices[0].finish_reason == "length"


def test_streaming_chat_matches_the_plain_answer(client):
    body = dict(model="tiny:pf-8", messages=[{"role": "user", "content": PROBLEM}], seed=21)
    plain = client.chat.completions.create(**body)
    stream = client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
    pieces, finish, block, usage = [], None, None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
            block = (chunk.model_extra or {}).get("itscale") or block
        else:
            usage = chunk.usage
    assert "".join(pieces) == plain.choices[0].message.content
    assert len([p for p in pieces if p]) == plain.choices[0].message.content.count("\n") + 1  # one chunk per step
    assert finish == "stop"
    assert block["candidates"] == plain.model_extra["itscale"]["candidates"]
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_streaming_completions_with_the_openai_iterator(client):
    plain = client.completions.create(model="tiny:sc-4", prompt=PROBLEM, seed=8)
    stream = client.completions.create(model="tiny:sc-4", prompt=PROBLEM, seed=8, stream=True)
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_sends_progress_comments_then_chunks_then_done(server):
    lines = []
    with httpx.stream("POST", server.url + "/chat/completions", headers={"Authorization": f"Bearer {ALICE}"},
                      json=chat_body("tiny:pf-16", stream=True, seed=1), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    progress = [line for line in lines if line.startswith(": progress ")]
    data = [line for line in lines if line.startswith("data: ")]
    assert lines[0].startswith(": accepted ")
    assert progress, "no progress comment while the method ran"
    calls = [json.loads(line.split(" ", 2)[2])["policy_calls"] for line in progress]
    assert calls == sorted(calls) and calls[-1] >= 2
    assert lines.index(progress[-1]) < lines.index(data[0])  # progress first, then the answer
    assert data[-1] == "data: [DONE]"
    assert json.loads(data[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_auth_failures(server):
    unauthorized = server.outcome("unauthorized")
    for key in ("sk-wrong-key-0123456789", ALICE[:-1], ALICE + "0"):
        c = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROBLEM}])
        assert err.value.status_code == 401
        assert err.value.body["code"] == "invalid_api_key" and "invalid API key" in err.value.body["message"]
        assert err.value.response.json()["error"]["type"] == "authentication_error"
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}):  # no key
        r = httpx.post(server.url + "/chat/completions", json=chat_body(), headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["message"].startswith("no API key given")
    assert httpx.get(server.url + "/models").status_code == 401
    assert httpx.get(server.root + "/health").status_code == 200  # open, like vLLM's
    assert server.outcome("unauthorized") == unauthorized + 7


def test_keys_from_the_environment(tight):
    c = openai.OpenAI(base_url=tight.url, api_key=TIGHT, max_retries=0)
    assert c.models.list().data[0].id == "tiny"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tight.url, api_key=ALICE, max_retries=0).models.list()


def _error(server, body, key=ALICE, path="/chat/completions"):
    r = httpx.post(server.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30,
                   **({"content": body} if isinstance(body, (str, bytes)) else {"json": body}))
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return r.status_code, err


@pytest.mark.parametrize("body, param, words", [
    (chat_body(itscale={"method": "annealing"}), "itscale.method", "unknown method 'annealing'"),
    (chat_body(itscale={"budget": 0}), "itscale.budget", "greater than or equal to 1"),
    (chat_body(itscale={"budget": "8"}), "itscale.budget", "valid integer"),
    (chat_body(itscale={"method": "pf", "params": {"temperature": -1}}), "itscale.params.temperature",
     "greater than 0"),
    (chat_body(itscale={"method": "pf", "params": {"temprature": 1}}), "itscale.params.temprature", "unknown field"),
    (chat_body(itscale={"budgte": 4}), "itscale.budgte", "unknown field"),
    (chat_body("tiny:beam-6"), "model", "not divisible by beam_width 4"),
    (chat_body("tiny:pf-8", itscale={"method": "bon"}), "itscale.method", "conflicts with the model-name suffix"),
    (chat_body("tiny:pf/8"), "model", "cannot read the suffix"),
    (chat_body(temperature=3), "temperature", "less than or equal to 2"),
    (chat_body(stop=["\n"]), "stop", "not supported"),
    (chat_body(logprobs=True), "logprobs", "not supported"),
    (chat_body(n=0), "n", "greater than or equal to 1"),
    ({"model": "tiny"}, "messages", "required"),
    ({"model": "tiny", "messages": [{"role": "system", "content": "be brief"}]}, "messages", "no message with role 'user'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]", "only text"),
    ({"messages": [{"role": "user", "content": PROBLEM}]}, "model", "required"),
])
def test_invalid_bodies_get_a_400_naming_the_field(server, body, param, words):
    status, err = _error(server, body)
    assert status == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param and words in err["message"], err


def test_other_request_errors(server):
    status, err = _error(server, "{not json")
    assert status == 400 and "not valid JSON" in err["message"]
    status, err = _error(server, chat_body("gpt-4o"))
    assert status == 404 and err["code"] == "model_not_found" and "'tiny'" in err["message"]
    status, err = _error(server, {"model": "tiny", "prompt": ["a", "b"]}, path="/completions")
    assert status == 400 and err["param"] == "prompt"
    status, err = _error(server, chat_body(), path="/chat/completion")
    assert status == 404
    status, err = _error(server, chat_body("tiny:bon-2", "Start at 3. " * 300))  # longer than the model's context
    assert status == 400 and err["code"] == "context_length_exceeded" and "leaves no room" in err["message"]
    r = httpx.post(server.url + "/chat/completions", headers={"Authorization": f"Bearer {ALICE}"},
                   json=chat_body("tiny:greedy", frobnicate=1, messages=[
                       {"role": "system", "content": "x"}, {"role": "user", "content": PROBLEM}]))
    assert r.status_code == 200
    assert r.json()["itscale"]["warnings"] == ["1 other message(s) ignored: the last user message is the problem",
                                               "ignored unknown field(s): frobnicate"]


def test_a_deeply_nested_body_is_a_400_not_a_server_error(server):
    r = httpx.post(server.url + "/chat/completions", content="[" * 100_000,
                   headers={"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert "nests" in r.json()["error"]["message"]
    assert "RecursionError" not in server.log_text()


def test_a_half_sent_body_is_cut_off_after_the_body_timeout(server):
    import socket
    import time
    from urllib.parse import urlsplit

    where = urlsplit(server.root)
    with socket.create_connection((where.hostname, where.port), timeout=40) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {ALICE}\r\nContent-Length: 200\r\n\r\n".encode() + b'{"model": "ti')
        t = time.monotonic()
        reply = sock.recv(4096).decode()  # the status line arrives after the timeout ...
        waited = time.monotonic() - t
        while "}}" not in reply:  # ... and the body may follow in another segment
            more = sock.recv(4096).decode()
            if not more:
                break
            reply += more
    assert reply.startswith("HTTP/1.1 408"), reply[:200]
    assert "--body-timeout" in reply
    assert 8 < waited < 30  # the server's default: 10 s


def test_a_key_limit_below_the_default_budget_is_said(server):
    low = openai.OpenAI(base_url=server.url, api_key=LOW, max_retries=0)
    r = low.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROBLEM}], seed=0)
    block = r.model_extra["itscale"]
    assert block["budget"] == 2
    assert block["warnings"] == ["itscale.budget: the server's default budget 4 lowered to this API key's limit of 2"]
    # within the limit nothing is said
    r = low.chat.completions.create(model="tiny:pf-2", messages=[{"role": "user", "content": PROBLEM}], seed=0)
    assert r.model_extra["itscale"]["warnings"] == []


def test_limits_of_the_api_key(server):
    small = openai.OpenAI(base_url=server.url, api_key=SMALL, max_retries=0)
    msgs = [{"role": "user", "content": PROBLEM}]
    with pytest.raises(openai.BadRequestError) as err:
        small.chat.completions.create(model="tiny", messages=msgs, extra_body={"itscale": {"budget": 8}})
    assert err.value.body["code"] == "budget_exceeds_limit" and err.value.body["param"] == "itscale.budget"
    assert "limit of 4" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        small.chat.completions.create(model="tiny:pf-16", messages=msgs)
    assert err.value.body["code"] == "budget_exceeds_limit" and err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        small.chat.completions.create(model="tiny:greedy", messages=msgs, max_tokens=64)
    assert err.value.body["code"] == "max_tokens_exceeds_limit" and err.value.body["param"] == "max_tokens"
    r = small.chat.completions.create(model="tiny:bon-4", messages=msgs)  # within the limits
    assert r.model_extra["itscale"]["budget"] == 4
    # the same request with a bigger key is fine
    alice = openai.OpenAI(base_url=server.url, api_key=ALICE, max_retries=0)
    assert alice.chat.completions.create(model="tiny:bon-8", messages=msgs, max_tokens=64).choices


def test_a_prompt_longer_than_the_context_is_a_400_naming_the_limit_and_not_retried(server):
    """A 1 MB prompt: the embedded policy has 256 positions. The official client (its default two
    retries) sends it once, gets a 400 naming the limit, and is told not to retry."""
    patient = openai.OpenAI(base_url=server.url, api_key=ALICE)  # max_retries=2, the default
    before = server.outcome("invalid"), server.outcome("error")
    with pytest.raises(openai.BadRequestError) as err:
        patient.chat.completions.create(model="tiny:pf-4", messages=[{"role": "user", "content": "1+1 " * 250_000}])
    body = err.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages", body
    assert "context is 256 tokens" in body["message"] and "prompt is 1000003 tokens" in body["message"], body["message"]
    assert err.value.response.headers["x-should-retry"] == "false"
    assert (server.outcome("invalid"), server.outcome("error")) == (before[0] + 1, before[1])  # sent once
    # a prompt that fits is still answered
    assert patient.chat.completions.create(model="tiny:greedy", messages=[{"role": "user", "content": PROBLEM}]).choices


def test_a_client_that_leaves_in_the_middle_of_its_body_is_counted_as_cancelled_without_a_traceback(server):
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(server.root)
    before = server.outcome("cancelled")
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {ALICE}\r\nContent-Length: 200\r\n\r\n".encode() + b'{"model": "ti')
        time.sleep(0.3)  # the server is reading the body ...
    # ... when the connection closes
    server.wait_for(lambda m: m['itscale_requests_total{outcome="cancelled"}'] == before + 1, timeout=10,
                    what="the half-sent request counted as cancelled")
    log = server.log_text()
    assert "ClientDisconnect" not in log and "Exception in ASGI application" not in log, log


def test_an_alias_runs_at_the_default_budget_or_a_named_budget_is_refused_with_the_budgets_it_takes(server):
    alice = openai.OpenAI(base_url=server.url, api_key=ALICE, max_retries=0)
    msgs = [{"role": "user", "content": PROBLEM}]
    r = alice.chat.completions.create(model="tiny:pt", messages=msgs, seed=0)  # default budget 4: not a multiple of 6
    block = r.model_extra["itscale"]
    assert block["method"] == "parallel_tempering" and block["budget"] == 6, block
    assert block["warnings"] == ["itscale.budget: parallel_tempering cannot run at the server's default budget 4; "
                                 "it ran at 6, the next budget it takes"]
    with pytest.raises(openai.BadRequestError) as err:
        alice.chat.completions.create(model="tiny:pt-8", messages=msgs)
    body = err.value.body
    assert body["code"] == "budget_not_supported" and body["param"] == "model", body
    assert "it takes 6, 12, 18, 24, 30, 36, 42, 48, … (up to this key's limit of 64)" in body["message"], body


def test_half_sent_headers_are_cut_off_after_the_header_timeout(server):
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(server.root)
    with socket.create_connection((where.hostname, where.port), timeout=40) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")  # and nothing more
        t = time.monotonic()
        reply = sock.recv(4096)
        waited = time.monotonic() - t
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"--header-timeout" in reply, reply[:200]
    assert 8 < waited < 30  # the server's default: 10 s; then the connection is closed
    # a kept-alive connection still serves request after request
    with httpx.Client(base_url=server.root) as c:
        assert [c.get("/health").status_code for _ in range(3)] == [200, 200, 200]


def test_an_off_task_prompt_to_the_embedded_model_is_answered_with_a_warning(server):
    alice = openai.OpenAI(base_url=server.url, api_key=ALICE, max_retries=0)
    r = alice.chat.completions.create(model="tiny:bon-2", seed=0,
                                      messages=[{"role": "user", "content": "What is the capital of France?"}])
    warnings = r.model_extra["itscale"]["warnings"]
    assert any(w.startswith("messages: the embedded model only knows the arithmetic task") and "France" in w
               for w in warnings), warnings
    r = alice.chat.completions.create(model="tiny:bon-2", seed=0, messages=[{"role": "user", "content": PROBLEM}])
    assert r.model_extra["itscale"]["warnings"] == []


def test_the_log_and_the_errors_hold_no_key_and_no_prompt(server):
    wrong = "sk-wrong-key-do-not-log-31415"
    with pytest.raises(openai.AuthenticationError) as err:
        openai.OpenAI(base_url=server.url, api_key=wrong, max_retries=0).models.list()
    assert wrong not in json.dumps(err.value.body)
    alice = openai.OpenAI(base_url=server.url, api_key=ALICE, max_retries=0)
    secret_prompt = "Start at 271828. Apply in order: +1."
    alice.chat.completions.create(model="tiny:greedy", messages=[{"role": "user", "content": secret_prompt}])
    with pytest.raises(openai.BadRequestError):
        alice.chat.completions.create(model="tiny:greedy", messages=[{"role": "user", "content": secret_prompt}],
                                      temperature=-1)
    log = server.log.read_text(errors="replace")  # the whole log of this server
    assert "key=alice" in log  # requests are logged by key name ...
    for secret in (wrong, ALICE, SMALL, SOLO, LOW, "271828"):  # ... never by key, never with the prompt
        assert secret not in log, secret

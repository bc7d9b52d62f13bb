"""Model specs and the one loader: what each spec becomes, and the errors a new user meets."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from itscale.backends import PolicySpec, PRMSpec, check_placement, load_policy, load_prm, served_model

URL = "http://policy-box:8000/v1"


def test_specs_name_the_field_and_the_fix(tmp_path):
    cases = [
        (dict(device="gpu"), "device", "auto, cpu, cuda, cuda:N, mps"),
        (dict(device="cuda:x"), "device", "unknown device"),
        (dict(dtype="float64"), "dtype", "'auto', 'float32', 'bfloat16' or 'float16'"),
        (dict(model=[]), "model", "at least one URL"),
        (dict(model=[URL, "not-a-url"]), "model", "'not-a-url' is not"),
        (dict(model=str(tmp_path / "missing.gguf")), "model", "no such .gguf file"),
        (dict(model=str(tmp_path / "missing")), "model", "is not a folder"),
        (dict(model="none"), "model", "a policy is needed"),
        (dict(max_batch=0), "max_batch", "greater than or equal to 1"),
        (dict(merge_prompts=0), "merge_prompts", "greater than or equal to 1"),
    ]
    for fields, field, message in cases:
        with pytest.raises(ValidationError) as info:
            PolicySpec(**fields)
        (error,) = info.value.errors()
        assert error["loc"][0] == field and message in str(info.value), (fields, info.value)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert PolicySpec(model=str(tmp_path / "model.gguf")).local_path(tmp_path).name == "model.gguf"
    assert PolicySpec(model=[URL]).model == URL  # one URL in a list is that URL
    assert PolicySpec(model=[URL, URL.replace("policy", "policy-2")]).urls[1].startswith("http://policy-2")
    assert not PRMSpec(model="none").enabled and PRMSpec().enabled and PRMSpec(model="NONE").urls == []


def test_a_spec_becomes_the_backend_its_model_names(monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("httpx")
    import httpx

    from itscale.lm import HFGenerator, Lookahead, OpenAIGenerator
    from itscale.rewards import HFTagPRM, RemoteRewardPRM, RemoteTagPRM

    policy = load_policy("embedded", device="cpu", max_batch=4)
    assert isinstance(policy, HFGenerator) and str(policy.device) == "cpu" and policy.max_batch == 4
    import torch

    assert policy.dtype == torch.float32  # auto on the CPU
    assert isinstance(load_prm(PRMSpec(device="cpu"), delimiter="\n"), HFTagPRM)
    assert load_prm("none") is None

    served = {"http://policy-box:8000/v1/models": [{"id": "policy", "max_model_len": 256}],
              "http://prm-box:8000/v1/models": [{"id": "prm"}]}
    monkeypatch.setattr(httpx, "get", lambda url, timeout: httpx.Response(
        200, json={"data": served[url]}, request=httpx.Request("GET", url)))
    remote = load_policy(URL, tokenizer="embedded")
    assert isinstance(remote, OpenAIGenerator) and remote.model == "policy" and remote.api == "completions"
    # vLLM lists its context length: a prompt's room is known before any request
    # the chat prompt of "1+1" is 6 tokens: <|user|> 1 + 1 <|end|> <|assistant|>
    assert remote.context_length == 256 and remote.context_room("1+1") == 256 - 6
    assert policy.context_room("1+1") == remote.context_room("1+1")  # (the local model: 256 positions)
    wrapped = load_policy(PolicySpec(model=URL, tokenizer="embedded", kv_block=32))
    assert isinstance(wrapped, Lookahead) and wrapped.generator.model == "policy"
    assert isinstance(load_prm("http://prm-box:8000", tokenizer="embedded"), RemoteTagPRM)
    assert isinstance(load_prm("http://prm-box:8000", kind="classifier", tokenizer="embedded", step_tag="§"),
                      RemoteRewardPRM)
    with pytest.raises(ValueError, match="separator token .<extra_0>. must be a single token"):
        load_prm("http://prm-box:8000", kind="classifier", tokenizer="embedded")
    with pytest.raises(ValueError, match=r"policy.model: http://policy-box:8000/v1 does not serve 'other'"):
        load_policy(URL, served_model="other")
    with pytest.raises(ValueError, match="serve different models"):
        served_model([URL, "http://prm-box:8000/v1"], None, "policy.model")
    with pytest.raises(ValueError, match=r"--policy-api-key-env: the environment variable NO_SUCH_KEY_VAR is not set"):
        load_policy(URL, tokenizer="embedded", api_key_env="NO_SUCH_KEY_VAR", where="--policy")


def test_an_absent_device_is_an_error_naming_the_setting():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=r"^prm.device: device 'cuda' is not available"):
        check_placement(PRMSpec(device="cuda"), "prm")
    with pytest.raises(ValueError, match=r"^--policy-device: device 'cuda:1' is not available"):
        load_policy("embedded", device="cuda:1", where="--policy")
    check_placement(PolicySpec(model=URL, device="cuda"))  # a URL runs elsewhere: not checked
    check_placement(PRMSpec(model="none", device="cuda"))


def test_the_bench_refuses_an_absent_device_before_writing_anything(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from itscale.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"methods: [{{name: greedy}}]\nprm: {{model: none}}\noutput: {tmp_path / 'out'}\n")
    assert main(["bench", str(config), "--device", "cuda"]) == 2
    assert not (tmp_path / "out").exists()


def test_serve_flags_name_themselves(capsys):
    from itscale.cli import main

    for argv, message in ((["--device", "gpu"], "--device: unknown device 'gpu'"),
                          (["--prm-device", "tpu"], "--prm-device: unknown device 'tpu'"),
                          (["--policy", f"{URL},not-a-url", "--prm", "none"], "--policy: a list of models"),
                          (["--policy", "missing.gguf"], "--policy: 'missing.gguf': no such .gguf file")):
        assert main(["serve", *argv]) == 2
        assert message in capsys.readouterr().err, argv


def test_importing_the_backend_layer_imports_neither_torch_nor_httpx():
    import subprocess

    code = ("import sys, itscale, itscale.backends; from itscale.backends import PolicySpec; PolicySpec(); "
            "itscale.load_policy; print(sorted(m for m in ('torch', 'transformers', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_store_key_of_a_config_is_what_it_was_before_device_and_dtype_existed():
    """Stores written before the backend layer keep their keys (values computed with the code before it)."""
    from itscale.bench.config import validate_config

    old = validate_config({"methods": [{"name": "particle_filtering"}]})
    assert old.method_hash(old.methods[0], "abc") == "9f870148ee8ac99f"
    http = validate_config({"methods": [{"name": "self_consistency"}], "prm": {"model": "none"},
                            "policy": {"model": "http://x:1/v1", "kv_block": 32}})
    assert http.method_hash(http.methods[0], "abc") == "a5026016b25428b1"
    placed = validate_config({"methods": [{"name": "particle_filtering"}], "policy": {"device": "cpu"},
                              "prm": {"device": "cpu", "timeout": 5}})
    assert placed.method_hash(placed.methods[0], "abc") == "9f870148ee8ac99f"  # placement is not a result
    bf16 = validate_config({"methods": [{"name": "particle_filtering"}], "policy": {"dtype": "bfloat16"}})
    assert bf16.method_hash(bf16.methods[0], "abc") != "9f870148ee8ac99f"  # a dtype changes the numbers

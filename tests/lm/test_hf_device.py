"""Device and dtype resolution, and .gguf files, of the one Hugging Face loading path (lm.loading.load_hf)."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest_models import save_model, tiny_causal_lm, tiny_token_classifier  # noqa: E402
from itscale.lm import HFGenerator, ModelLoadError  # noqa: E402
from itscale.lm import loading  # noqa: E402
from itscale.lm.loading import load_hf, resolve_device, resolve_dtype  # noqa: E402
from itscale.rewards import HFClassifierPRM, HFTagPRM  # noqa: E402
from itscale.types import Problem, SamplingParams, ScoreRequest, StepRequest  # noqa: E402


@pytest.fixture
def no_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.version, "cuda", "12.4")


def test_importing_loading_does_not_import_torch():
    code = "import sys, itscale.lm.loading; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, no_accelerators):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")


def test_named_devices(two_gpus):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device(" CUDA:1 ") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"'cuda:2' is not available .*2 CUDA devices.*cpu, cuda:0, cuda:1"):
        resolve_device("cuda:2")


def test_unavailable_or_unknown_devices_are_refused(no_accelerators):
    for name in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"'cuda(:0)?' is not available .*available: cpu$"):
            resolve_device(name)
    with pytest.raises(ValueError, match=r"'mps' is not available \(torch sees no MPS device\); available: cpu"):
        resolve_device("mps")
    for name in ("gpu", "tpu", "cuda:x", 3):
        with pytest.raises(ValueError, match=r"is not one of: auto, cpu, cuda, cuda:N, mps"):
            resolve_device(name)


def test_dtype_resolution(no_accelerators):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert resolve_dtype("float32", cuda) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("float16", "cpu") is torch.float16
    assert resolve_dtype(torch.float64, cpu) is torch.float64
    # auto: the stored 16-bit dtype on an accelerator, float32 on the CPU or for 32-bit checkpoints
    assert resolve_dtype("auto", cuda, "bfloat16") is torch.bfloat16
    assert resolve_dtype("auto", "cuda:0", "torch.float16") is torch.float16
    assert resolve_dtype("auto", mps, torch.float16) is torch.float16
    assert resolve_dtype("auto", cpu, "bfloat16") is torch.float32
    assert resolve_dtype(None, "auto", "bfloat16") is torch.float32  # auto device: the CPU here
    assert resolve_dtype("auto", cuda, "float32") is torch.float32
    assert resolve_dtype("auto", cuda, None) is torch.float32
    for name in ("fp16", "half", "int8", 16):
        with pytest.raises(ValueError, match=r"is not one of: auto, float32, bfloat16, float16"):
            resolve_dtype(name, cpu)


def test_auto_dtype_reads_the_checkpoint_on_an_accelerator(tmp_path, char_tokenizer, monkeypatch):
    model = tiny_causal_lm(char_tokenizer, seed=1)
    path = save_model(model, char_tokenizer, tmp_path / "lm")
    assert loading.config_dtype(path) == "float32"
    (path / "config.json").write_text((path / "config.json").read_text().replace('"float32"', '"bfloat16"'))
    assert loading.config_dtype(path) == "bfloat16"
    seen = {}

    def fake_weights(folder, kind, device, dtype, gguf_file=None):  # (no GPU here: record what would be loaded)
        seen.update(device=device, dtype=dtype)
        return model

    monkeypatch.setattr(loading, "_from_pretrained", fake_weights)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    load_hf(path, kind="causal_lm")
    assert seen == {"device": torch.device("cuda"), "dtype": torch.bfloat16}
    load_hf(path, kind="causal_lm", device="cuda:1", dtype="float32")
    assert seen == {"device": torch.device("cuda", 1), "dtype": torch.float32}


def test_defaults_are_auto_and_give_the_cpu_in_float32_here(tiny_lm_dir, char_tokenizer, no_accelerators):
    gen = HFGenerator.from_pretrained(tiny_lm_dir, run_in_thread=False)
    assert (gen.device, gen.dtype, next(gen.model.parameters()).dtype) == (torch.device("cpu"), torch.float32,
                                                                           torch.float32)
    prm = HFTagPRM.from_pretrained(tiny_lm_dir, run_in_thread=False)
    assert (prm.device, prm.dtype) == (torch.device("cpu"), torch.float32)
    cls = HFClassifierPRM(tiny_token_classifier(char_tokenizer, seed=2), char_tokenizer, separator_token="§",
                          run_in_thread=False)
    assert (cls.device, cls.dtype) == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="'cuda' is not available"):
        HFGenerator.from_pretrained(tiny_lm_dir, device="cuda")
    with pytest.raises(ValueError, match="dtype 'fp16' is not one of"):
        HFTagPRM.from_pretrained(tiny_lm_dir, dtype="fp16")


def test_a_model_object_keeps_its_dtype_unless_told(char_tokenizer):
    model = tiny_causal_lm(char_tokenizer, seed=1).to(torch.bfloat16)
    kept = load_hf(model, char_tokenizer, device="cpu")
    assert kept.model is model and kept.dtype is torch.bfloat16 and kept.device == torch.device("cpu")
    cast = load_hf(tiny_causal_lm(char_tokenizer, seed=1), char_tokenizer, dtype="float16")
    assert cast.dtype is torch.float16 and next(cast.model.parameters()).dtype is torch.float16
    assert not cast.model.training
    with pytest.raises(ValueError, match=r"HFTagPRM\(model_object\) needs tokenizer"):
        HFTagPRM(model)
    with pytest.raises(ValueError, match="kind must be"):
        load_hf(model, char_tokenizer, kind="seq2seq")


def test_gguf_without_the_gguf_package_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "model-Q8_0.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    monkeypatch.setattr(loading, "_has_package", lambda name: name != "gguf")
    for load in (HFGenerator.from_pretrained, HFTagPRM.from_pretrained, HFClassifierPRM.from_pretrained):
        with pytest.raises(ModelLoadError, match="pip install gguf") as err:
            load(path)
        assert err.value.path == str(path) and str(path) in str(err.value)
    monkeypatch.setattr(loading, "_has_package", lambda name: False)
    with pytest.raises(ModelLoadError, match="packages gguf and accelerate: pip install gguf accelerate"):
        load_hf(path)
    with pytest.raises(ModelLoadError, match="no such file"):
        load_hf(tmp_path / "missing.gguf")


def test_gguf_file_loads_model_and_tokenizer_from_the_file(tmp_path, char_tokenizer, monkeypatch):
    """With the packages present, model and tokenizer come from ``from_pretrained(parent, gguf_file=name)``."""
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setattr(loading, "_has_package", lambda name: True)
    calls = []
    model = tiny_causal_lm(char_tokenizer, seed=1)

    def fake_model(source, **kwargs):
        calls.append(("model", source, kwargs))
        return model, {"missing_keys": []}

    def fake_tokenizer(source, **kwargs):
        calls.append(("tokenizer", source, kwargs))
        return char_tokenizer

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    gen = HFGenerator.from_pretrained(path, device="cpu", run_in_thread=False)
    assert gen.model is model and gen.tokenizer is char_tokenizer
    assert calls == [
        ("tokenizer", str(tmp_path), {"local_files_only": True, "gguf_file": "tiny.gguf"}),
        ("model", str(tmp_path), {"local_files_only": True, "dtype": torch.float32, "output_loading_info": True,
                                  "gguf_file": "tiny.gguf"}),
    ]
    req = StepRequest(Problem("p", "1+2="), (), 2, SamplingParams(temperature=1.0, max_step_tokens=6, seed=4), ())
    assert len(gen.generate_steps_sync([req])[0]) == 2
    # a given tokenizer replaces the file's; a failure names the file
    calls.clear()
    prm = HFTagPRM.from_pretrained(path, tokenizer=char_tokenizer, run_in_thread=False)
    assert [c[0] for c in calls] == ["model"]
    assert len(prm.score_steps_sync([ScoreRequest(Problem("p", "1+2="), ("3\n",))])[0].scores) == 1

    def broken(source, **kwargs):
        raise OSError("bad magic")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(ModelLoadError, match="the weights failed to load: OSError: bad magic") as err:
        HFGenerator.from_pretrained(path, tokenizer=char_tokenizer)
    assert err.value.path == str(path)

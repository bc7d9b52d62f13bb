"""Loading model folders: a clear ModelLoadError naming the folder, or a working backend."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest_models import save_model, tiny_causal_lm, tiny_token_classifier  # noqa: E402
from itscale.lm import HFGenerator, ModelLoadError  # noqa: E402
from itscale.rewards import HFClassifierPRM, HFTagPRM  # noqa: E402
from itscale.types import Problem, SamplingParams, StepRequest  # noqa: E402

LOADERS = [HFGenerator.from_pretrained, HFTagPRM.from_pretrained, HFClassifierPRM.from_pretrained]


def broken_copy(src, dst, remove=(), write=None):
    shutil.copytree(src, dst)
    for name in remove:
        (dst / name).unlink()
    for name, text in (write or {}).items():
        (dst / name).write_text(text)
    return dst


@pytest.mark.parametrize("load", LOADERS)
def test_missing_folder(tmp_path, load):
    path = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match="no such directory") as err:
        load(path)
    assert str(path) in str(err.value) and err.value.path == str(path)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("load", LOADERS)
def test_folder_without_weights(tmp_path, tiny_lm_dir, load):
    path = broken_copy(tiny_lm_dir, tmp_path / "noweights", remove=["model.safetensors"])
    with pytest.raises(ModelLoadError, match="no weights found") as err:
        load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("load", LOADERS)
def test_corrupt_config(tmp_path, tiny_lm_dir, load):
    path = broken_copy(tiny_lm_dir, tmp_path / "badconfig", write={"config.json": '{"model_type": "llama", "hidden'})
    with pytest.raises(ModelLoadError, match="config.json is corrupt") as err:
        load(path)
    assert str(path) in str(err.value)


def test_other_broken_folders(tmp_path, tiny_lm_dir):
    no_config = broken_copy(tiny_lm_dir, tmp_path / "noconfig", remove=["config.json"])
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        HFGenerator.from_pretrained(no_config)
    no_tok = broken_copy(tiny_lm_dir, tmp_path / "notok", remove=["tokenizer.json", "tokenizer_config.json"])
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        HFGenerator.from_pretrained(no_tok)
    truncated = broken_copy(tiny_lm_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="weights failed to load") as err:
        HFGenerator.from_pretrained(truncated)
    assert str(truncated) in str(err.value)
    a_file = tiny_lm_dir / "config.json"
    with pytest.raises(ModelLoadError, match="not a directory"):
        HFGenerator.from_pretrained(a_file)


def test_loaded_folder_generates_like_the_model_object(tiny_lm_dir, char_tokenizer):
    loaded = HFGenerator.from_pretrained(tiny_lm_dir, run_in_thread=False)
    direct = HFGenerator(tiny_causal_lm(char_tokenizer, seed=1), char_tokenizer, run_in_thread=False)
    assert loaded.capabilities.n_parameters == direct.capabilities.n_parameters > 0
    assert loaded.capabilities.logprobs and loaded.capabilities.n_per_request
    req = StepRequest(Problem("p", "1+2="), (), 3, SamplingParams(temperature=1.0, max_step_tokens=12, seed=4), ())
    a, b = loaded.generate_steps_sync([req])[0], direct.generate_steps_sync([req])[0]
    assert [s.text for s in a] == [s.text for s in b]
    prm = HFTagPRM.from_pretrained(tiny_lm_dir, run_in_thread=False)
    assert prm.capabilities.n_parameters == loaded.capabilities.n_parameters


def test_classifier_folder_loads(tmp_path, char_tokenizer):
    tok = char_tokenizer
    path = save_model(tiny_token_classifier(tok, seed=2), tok, tmp_path / "cls")
    prm = HFClassifierPRM.from_pretrained(path, separator_token="§", run_in_thread=False)
    assert prm.capabilities.n_parameters > 0
    # a config that asks for more layers than the weights hold
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="weights do not match the architecture") as err:
        HFClassifierPRM.from_pretrained(path, separator_token="§")
    assert "layers.2" in str(err.value)

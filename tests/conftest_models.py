"""Tiny random Hugging Face models for the backend tests (no downloads).

A character-level tokenizer built with ``tokenizers`` (every character is a token;
special tokens ``<|pad|> <|end|> <|user|> <|assistant|>``) wrapped in
``PreTrainedTokenizerFast`` with a chat template, and tiny randomly initialised
Llama models: a causal LM (policy, or tag-style PRM) and a token classifier.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification, PreTrainedTokenizerFast  # noqa: E402

# Tiny models gain nothing from intra-op threads, and with pytest-xdist workers (or any
# other busy process) on a 2-core machine, OpenMP's spinning threads slow them ~100×.
torch.set_num_threads(1)

SPECIAL = ("<|pad|>", "<|end|>", "<|user|>", "<|assistant|>")
CHARS = string.digits + "+-*/=()§ \n:." + string.ascii_letters
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in dict.fromkeys(CHARS):
        vocab[ch] = len(vocab)
    vocab["<unk>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")  # (?m): '.' matches \n
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|end|>", pad_token="<|pad|>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tiny_config(tokenizer, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_causal_lm(tokenizer, seed: int = 0, biases: dict[str, float] | None = None, **overrides) -> LlamaForCausalLM:
    """A random tiny Llama with sharpened next-token distributions.

    ``biases`` (token text -> logit bias) replaces the output head by one with a bias,
    so tests can make EOS or the step delimiter likely; the pad/user/assistant/unk
    tokens always get -30, so generated text is plain characters. (A biased model is
    for in-memory use: its head does not survive ``save_pretrained``/loading.)
    """
    with torch.random.fork_rng():  # seeded weights without touching the global generator
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(tokenizer, **overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper (less uniform) next-token distributions
        if biases is not None:
            with torch.random.fork_rng():
                head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            for text in ("<|pad|>", "<|user|>", "<|assistant|>", "<unk>"):
                head.bias[tokenizer.convert_tokens_to_ids(text)] = -30.0
            for text, value in biases.items():
                head.bias[tokenizer.convert_tokens_to_ids(text)] += value
            model.lm_head = head
    return model


def tiny_token_classifier(tokenizer, seed: int = 0) -> LlamaForTokenClassification:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForTokenClassification(tiny_config(tokenizer, num_labels=2)).eval()


def save_model(model, tokenizer, folder: Path) -> Path:
    """``save_pretrained`` both, the way the zoo does (tokenizer class and template in the config)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if tokenizer.chat_template:
        cfg["chat_template"] = tokenizer.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm(char_tokenizer):
    """Plain characters, steps of ~10 characters, EOS now and then."""
    return tiny_causal_lm(char_tokenizer, seed=0, biases={"\n": 2.5, "<|end|>": 0.5})


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, char_tokenizer):
    return save_model(tiny_causal_lm(char_tokenizer, seed=1), char_tokenizer, tmp_path_factory.mktemp("tiny_lm"))

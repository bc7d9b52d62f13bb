"""The character-level tokenizer shared by the embedded policy and PRM.

One token per character: every printable ASCII character, the newline (the step
delimiter of the arithmetic task) and ``§`` (the PRM's step tag), plus a handful of
special tokens for the chat format. It is built with the ``tokenizers`` library
(a BPE model with an empty merge list, so a word falls apart into its characters)
and wrapped in :class:`transformers.PreTrainedTokenizerFast`, so a saved folder
loads with plain ``AutoTokenizer.from_pretrained`` and any tooling that reads a
``tokenizer.json`` (vLLM, llama.cpp converters) sees ordinary token ids.

Decoding is exact: ``decode(encode(x)) == x`` for any text over the alphabet.

The chat format::

    <|user|>Start at 7. Apply in order: +5, *3.<|end|><|assistant|>7+5=12\\n12*3=36\\nAnswer: 36<|end|>

``<|end|>`` ends every turn and is the end-of-sequence token.
"""

from __future__ import annotations

import string

from ..rewards.formats import EMBEDDED_TAG_FORMAT

PAD = "<|pad|>"
UNK = "<|unk|>"
EOS = "<|end|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SYSTEM = "<|system|>"
SPECIAL_TOKENS = (PAD, UNK, EOS, USER, ASSISTANT, SYSTEM)

#: Every character the tokenizer knows, in id order after the special tokens.
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127)) + EMBEDDED_TAG_FORMAT.tag
assert set(string.digits + "+-*=.,: ") <= set(ALPHABET)
assert all(len(t) == 1 for t in (EMBEDDED_TAG_FORMAT.tag, EMBEDDED_TAG_FORMAT.good, EMBEDDED_TAG_FORMAT.bad))

#: Jinja chat template (Hugging Face ``apply_chat_template`` and vLLM both render it).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

MODEL_MAX_LENGTH = 256


def chat_prompt(user_text: str) -> str:
    """What ``apply_chat_template([user], add_generation_prompt=True, tokenize=False)`` renders."""
    return f"{USER}{user_text}{EOS}{ASSISTANT}"


def build_tokenizer():
    """A fresh :class:`PreTrainedTokenizerFast` (ids: specials 0–5, then ``ALPHABET``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok

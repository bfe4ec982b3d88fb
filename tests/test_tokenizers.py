from __future__ import annotations

import json
import string

import pytest

from sedd_core.tokenizers import (
    MASK_PLACEHOLDER,
    CharTokenizer,
    TokenizerError,
    load_gpt2,
    render,
    resolve_tokenizer,
)


def test_gpt2_known_ids_and_round_trip(gpt2_vocab):
    tok = load_gpt2(vocab=gpt2_vocab)
    assert tok.vocab_size == 50257
    assert tok.encode("Hi, my name is") == [17250, 11, 616, 1438, 318]
    text = "Diffusion models denoise text in parallel — naïve café, 日本語 and <|endoftext|>."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|endoftext|>") == [50256]


def test_gpt2_vocab_resolution_order(gpt2_vocab, tmp_path):
    missing = tmp_path / "missing.tiktoken"
    with pytest.raises(TokenizerError, match="missing.tiktoken.*SEDD_GPT2_VOCAB.*not a file"):
        load_gpt2(vocab=missing)
    (tmp_path / "gpt2.tiktoken").write_bytes(gpt2_vocab.read_bytes())
    assert load_gpt2(tmp_path, vocab=missing).encode("Hi") == [17250]  # the model folder wins over the file


def test_gpt2_render_masks(gpt2_vocab):
    tok = load_gpt2(vocab=gpt2_vocab)
    ids = tok.encode("Hello world")
    assert render(tok, [ids[0], 50257, ids[1]], mask_id=50257) == "Hello" + MASK_PLACEHOLDER + " world"


def test_char_vocabulary_is_oxens():
    tok = CharTokenizer()
    assert tok.vocab_size == 98
    assert tok.encode("a") == [2] and tok.encode(" ") == [97] and tok.encode("\n") == [96]
    expected = string.ascii_letters + string.digits + string.punctuation + "\n "
    assert "".join(tok.decode_token(i) for i in range(2, 98)) == expected
    assert tok.unknown_characters("héllo ünïcode") == ["é", "ï", "ü"]
    assert render(tok, [2, 98, 3], mask_id=98) == "a" + MASK_PLACEHOLDER + "b"
    assert tok.decode([2, 98, 3], mask_id=98) == "ab"


def test_char_tokenizer_config_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"char_ords": [ord(c) for c in "abc"],
                                                                "model_max_length": 8}))
    tok = resolve_tokenizer(5, tmp_path)
    assert tok.encode("cab") == [4, 2, 3] and tok.model_max_length == 8


def test_resolution_rules(tmp_path):
    assert resolve_tokenizer(98, None).name == "char"
    with pytest.raises(TokenizerError, match="no tokenizer for a vocabulary of 31"):
        resolve_tokenizer(31, tmp_path)
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        resolve_tokenizer(98, tmp_path, explicit="sentencepiece")
    with pytest.raises(TokenizerError, match="has 98 tokens but the model was trained on 50257"):
        resolve_tokenizer(50257, tmp_path, explicit="char")

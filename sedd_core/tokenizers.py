"""Tokenizers: GPT-2 byte-level BPE through tiktoken (the `gpt2` tokenizer that the authors'
`run_sample.py` decodes with), and Oxen's character vocabulary."""
from __future__ import annotations

import json
import os
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

MASK_PLACEHOLDER = "\u2591"  # ░: how a mask token is drawn in progress displays
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = 50256
DEFAULT_CHARS = string.ascii_letters + string.digits + string.punctuation + "\n" + " "


class TokenizerError(ValueError):
    """No tokenizer could be resolved, or text it cannot encode; the message says what to do."""


class Tokenizer:
    name: str
    vocab_size: int  # real tokens, without the mask state

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode_token(self, token: int) -> str:
        raise NotImplementedError

    def unknown_characters(self, text: str) -> list[str]:
        return []

    def decode(self, tokens: Iterable[int], mask_id: int | None = None, placeholder: str | None = None) -> str:
        """Text of `tokens`; mask tokens become `placeholder` (dropped when it is None)."""
        return "".join(self.decode_pieces(tokens, mask_id, placeholder))

    def decode_pieces(self, tokens, mask_id=None, placeholder=None) -> list[str]:
        raise NotImplementedError


class CharTokenizer(Tokenizer):
    """0 [PAD], 1 [UNK], then one id per character of `chars` (Oxen's vocabulary by default)."""

    PAD, UNK = 0, 1

    def __init__(self, chars: str = DEFAULT_CHARS, model_max_length: int | None = None):
        self.name = "char"
        self.chars = chars
        self.model_max_length = model_max_length
        self._ids = {c: i + 2 for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + 2

    @classmethod
    def from_config_file(cls, path: Path) -> CharTokenizer:
        data = json.loads(Path(path).read_text())
        if "char_ords" not in data:
            raise TokenizerError(f"{path} has no `char_ords`; it is not an Oxen character tokenizer config")
        return cls("".join(chr(o) for o in data["char_ords"]), data.get("model_max_length"))

    def config_dict(self) -> dict:
        return {
            "tokenizer_class": "CharacterTokenizer",
            "char_ords": [ord(c) for c in self.chars],
            "model_max_length": self.model_max_length,
        }

    def unknown_characters(self, text: str) -> list[str]:
        return sorted({c for c in text if c not in self._ids})

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.UNK) for c in text]

    def decode_token(self, token: int) -> str:
        if token == self.PAD:
            return ""
        if token == self.UNK or not 2 <= token < self.vocab_size:
            return "\ufffd"
        return self.chars[token - 2]

    def decode_pieces(self, tokens, mask_id=None, placeholder=None) -> list[str]:
        out = []
        for tok in tokens:
            tok = int(tok)
            if mask_id is not None and tok == mask_id:
                out.append(placeholder or "")
            else:
                out.append(self.decode_token(tok))
        return out


class GPT2Tokenizer(Tokenizer):
    def __init__(self, encoding, vocab_file: Path | None = None):
        self.name = "gpt2"
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab
        self.vocab_file = vocab_file  # the gpt2.tiktoken read, or None for tiktoken's own download

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special={"<|endoftext|>"})

    def decode_token(self, token: int) -> str:
        return self.encoding.decode([token])

    def decode_pieces(self, tokens, mask_id=None, placeholder=None) -> list[str]:
        """One piece per run of real tokens (so multi-byte characters survive) and per mask."""
        pieces, run = [], []
        for tok in tokens:
            tok = int(tok)
            if mask_id is not None and tok == mask_id:
                if run:
                    pieces.append(self.encoding.decode(run))
                    run = []
                pieces.append(placeholder or "")
            else:
                run.append(tok)
        if run:
            pieces.append(self.encoding.decode(run))
        return pieces


def gpt2_vocab_file(model_dir: Path | None, vocab: str | os.PathLike | None = None) -> Path | None:
    """Where the GPT-2 ranks come from, in order: the model folder, the `vocab` file (SEDD_GPT2_VOCAB in the
    server and the CLI), else None (tiktoken's download)."""
    if model_dir is not None and (Path(model_dir) / "gpt2.tiktoken").is_file():
        return Path(model_dir) / "gpt2.tiktoken"
    if vocab:
        if not Path(vocab).is_file():
            raise TokenizerError(f"the GPT-2 vocabulary {vocab} (SEDD_GPT2_VOCAB) is not a file")
        return Path(vocab)
    return None


def load_gpt2(model_dir: Path | None = None, vocab: str | os.PathLike | None = None) -> GPT2Tokenizer:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    path = gpt2_vocab_file(model_dir, vocab)
    if path is None:
        try:
            return GPT2Tokenizer(tiktoken.get_encoding("gpt2"))
        except Exception as exc:
            raise TokenizerError(
                "the GPT-2 vocabulary could not be downloaded by tiktoken "
                f"({exc.__class__.__name__}: {exc}); put gpt2.tiktoken in the model folder "
                "or set SEDD_GPT2_VOCAB to its path"
            ) from exc
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(path)),
        special_tokens={"<|endoftext|>": GPT2_EOT},
    )
    return GPT2Tokenizer(encoding, vocab_file=path)


TOKENIZER_ALIASES = {"gpt2": "gpt2", "gpt-2": "gpt2", "char": "char", "chars": "char", "character": "char",
                     "characters": "char", "oxen-char": "char"}


def resolve_tokenizer(tokens: int, model_dir: Path | None = None, explicit: str | None = None,
                      gpt2_vocab: str | os.PathLike | None = None) -> Tokenizer:
    """An explicit config entry, else the folder's tokenizer_config.json, else by `tokens` (50257 or 98).
    `gpt2_vocab`: a gpt2.tiktoken file for GPT-2 models whose folder has none."""
    if explicit is not None:
        kind = TOKENIZER_ALIASES.get(str(explicit).lower())
        if kind is None:
            raise TokenizerError(f"unknown tokenizer {explicit!r} in the config; use 'gpt2' or 'char'")
    elif model_dir is not None and (Path(model_dir) / "tokenizer_config.json").is_file():
        kind = "char"
    elif tokens == 50257:
        kind = "gpt2"
    elif tokens == len(DEFAULT_CHARS) + 2:
        kind = "char"
    else:
        raise TokenizerError(
            f"no tokenizer for a vocabulary of {tokens} tokens: add `tokenizer: gpt2` or `tokenizer: char` "
            "to the config, or a tokenizer_config.json with `char_ords` to the model folder"
        )
    if kind == "gpt2":
        tok: Tokenizer = load_gpt2(model_dir, gpt2_vocab)
    elif model_dir is not None and (Path(model_dir) / "tokenizer_config.json").is_file():
        tok = CharTokenizer.from_config_file(Path(model_dir) / "tokenizer_config.json")
    else:
        tok = CharTokenizer()
    if tok.vocab_size != tokens:
        raise TokenizerError(
            f"the {tok.name} tokenizer has {tok.vocab_size} tokens but the model was trained on {tokens}"
        )
    return tok


def render(tokenizer: Tokenizer, tokens: Sequence[int], mask_id: int | None) -> str:
    """Text with masks drawn as the placeholder: what progress displays show."""
    return tokenizer.decode(tokens, mask_id, MASK_PLACEHOLDER)

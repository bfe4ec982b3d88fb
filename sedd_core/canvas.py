"""Canvases from segments: kept text and gaps at any positions, and the text of a finished row.

A canvas is an ordered list of segments: a `str` is text kept exactly, an `int` is a gap of that
many tokens for the model to fill. `["ROMEO. ", 40, " and JULIET ", 30, "."]` keeps three pieces
of text and generates 70 tokens between and around them. Kept text is tokenized segment by
segment, so it lands exactly where the list puts it (for GPT-2 the pieces are tokenized on their
own, which may differ from how the whole text would be tokenized; the characters are the same).
Empty strings are allowed and take no positions (so `[prefix, gap, suffix]` works with either
empty); they still count towards MAX_SEGMENTS. Kept text may also come already tokenized
(`tokenize_kept`), when a gap's size depends on how many tokens it takes.

`rewrite_segments` turns "regenerate these character spans of this text" into segments, and
`text_and_spans` turns a finished row back into its text and the character ranges of its gaps.
"""
from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass

from .tokenizers import GPT2Tokenizer, Tokenizer

MAX_SEGMENTS = 64


@dataclass(frozen=True)
class TokenizedText:
    """Kept text tokenized once by `tokenize_kept`, for a caller that needs its size before it lays the canvas
    out: `lay_out` places these tokens as they are."""

    text: str
    tokens: tuple[int, ...]


Segment = str | int | TokenizedText


class SegmentError(ValueError):
    """Segments or rewrite spans that cannot be laid out; the message names the segment or span."""


@dataclass(frozen=True)
class PlacedSegments:
    """Segments placed on a canvas of `length` positions: the kept tokens, the positions they fix, and
    where the gaps are."""

    tokens: list[int]  # one id per position; 0 at gap positions (they are not fixed)
    fixed: list[bool]  # True where kept text sits
    gaps: tuple[tuple[int, int], ...]  # token positions [start, end) of each gap, in segment order

    @property
    def length(self) -> int:
        return len(self.tokens)


def _show(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def check_segments(segments: object) -> list[Segment]:
    """The segments as a list, or a SegmentError for the first item that is not text or a positive gap."""
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence):
        raise SegmentError(f"segments must be a list of strings (kept text) and integers (gaps), "
                           f"got {type(segments).__name__}")
    segments = list(segments)
    if not segments:
        raise SegmentError("segments is empty: give at least one gap, e.g. [\"Once upon a time\", 40]")
    if len(segments) > MAX_SEGMENTS:
        raise SegmentError(f"segment {MAX_SEGMENTS} ({_show(segments[MAX_SEGMENTS])}) is one too many: "
                           f"at most {MAX_SEGMENTS} segments, got {len(segments)}")
    for i, item in enumerate(segments):
        if isinstance(item, bool) or not isinstance(item, (str, int, TokenizedText)):
            raise SegmentError(f"segment {i} is {_show(item)} ({type(item).__name__}); a segment is a string "
                               "(text kept exactly) or a whole number (a gap of that many tokens)")
        if isinstance(item, int) and item < 1:
            raise SegmentError(f"segment {i} is a gap of {item} tokens; a gap needs at least 1 token")
    if not any(isinstance(item, int) for item in segments):
        raise SegmentError("the segments hold no gap: add a whole number of tokens for the model to fill")
    return segments


def _kept_problem(tokenizer: Tokenizer, text: str, tokens: list[int] | None = None) -> str | None:
    """Why `text` (encoded as `tokens`, when given) cannot be kept exactly by itself, or None."""
    unknown = tokenizer.unknown_characters(text)
    if unknown:
        return f"holds characters this model's vocabulary cannot encode: {', '.join(repr(c) for c in unknown[:20])}"
    tokens = tokenizer.encode(text) if tokens is None else tokens
    if tokenizer.decode(tokens) != text:  # e.g. a lone surrogate: GPT-2 writes U+FFFD instead
        return "does not decode back to itself after encoding (a lone surrogate or other invalid character?)"
    return None


def tokenize_kept(tokenizer: Tokenizer, text: str) -> TokenizedText:
    """`text` as a segment of kept text, tokenized once; a SegmentError says why it cannot be kept exactly."""
    tokens = tokenizer.encode(text)
    problem = _kept_problem(tokenizer, text, tokens)
    if problem:
        raise SegmentError(f"{_show(text)} {problem}")
    return TokenizedText(text, tuple(tokens))


def lay_out(tokenizer: Tokenizer, segments: object, max_length: int) -> PlacedSegments:
    """The canvas of `segments`: at most `max_length` positions, every kept piece exactly encodable."""
    segments = check_segments(segments)
    problems = []
    encoded: list[list[int] | int] = []
    for i, item in enumerate(segments):
        if isinstance(item, int):
            encoded.append(item)
            continue
        if isinstance(item, TokenizedText):
            encoded.append(list(item.tokens))
            continue
        tokens = tokenizer.encode(item)
        problem = _kept_problem(tokenizer, item, tokens)
        if problem:
            problems.append(f"segment {i} ({_show(item)}) {problem}")
        encoded.append(tokens)
    if problems:
        raise SegmentError("; ".join(problems))
    sizes = [piece if isinstance(piece, int) else len(piece) for piece in encoded]
    total = sum(sizes)
    if total > max_length:
        i = next(i for i in range(len(sizes)) if sum(sizes[: i + 1]) > max_length)
        what = f"a gap of {segments[i]} tokens" if isinstance(segments[i], int) else f"{sizes[i]} tokens of text"
        raise SegmentError(
            f"the canvas takes {total} tokens but the model's length is {max_length}: it passes the length at "
            f"segment {i} ({what}); shorten the text or the gaps")
    tokens, fixed, gaps = [], [], []
    for piece in encoded:
        if isinstance(piece, int):
            gaps.append((len(tokens), len(tokens) + piece))
            tokens += [0] * piece
            fixed += [False] * piece
        else:
            tokens += piece
            fixed += [True] * len(piece)
    return PlacedSegments(tokens, fixed, tuple(gaps))


def rewrite_segments(tokenizer: Tokenizer, text: str, spans: object,
                     lengths: Sequence[int] | None = None) -> list[Segment]:
    """Segments that keep every character of `text` outside `spans` and regenerate each span in place.

    `spans` are character ranges [start, end) into `text` (Python string indices: code points), sorted
    and not overlapping (touching is fine). Each span's gap gets as many tokens as its current text
    encodes to, or `lengths[i]`. The kept text around the spans is tokenized piece by piece; a span may
    therefore cut what was one token of the whole text (the characters stay the same). A piece cannot be
    kept when it does not encode back to itself on its own (characters outside the vocabulary, lone
    surrogates); that is an error naming the span it borders."""
    if not isinstance(text, str):
        raise SegmentError(f"text must be a string, got {type(text).__name__}")
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence) or not spans:
        raise SegmentError("spans must be a non-empty list of [start, end] character ranges")
    if lengths is not None and len(lengths) != len(spans):
        raise SegmentError(f"lengths has {len(lengths)} entries for {len(spans)} spans; give one per span")
    segments: list[Segment] = []
    kept_from = 0
    for i, span in enumerate(spans):
        if (isinstance(span, (str, bytes)) or not isinstance(span, Sequence) or len(span) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in span)):
            raise SegmentError(f"span {i} is {_show(span)}; a span is [start, end], two whole numbers")
        start, end = span
        if not 0 <= start < end <= len(text):
            raise SegmentError(f"span {i} [{start}, {end}) is out of range: need 0 <= start < end <= "
                               f"{len(text)} (the text's length in characters)")
        if start < kept_from:
            raise SegmentError(f"span {i} [{start}, {end}) overlaps or comes before span {i - 1}; give the spans "
                               "in order without overlap")
        kept = text[kept_from:start]
        problem = _kept_problem(tokenizer, kept) if kept else None
        if problem:
            raise SegmentError(f"the text before span {i} ({_show(kept)}) {problem}")
        if lengths is None:
            size = len(tokenizer.encode(text[start:end]))
        else:
            size = lengths[i]
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise SegmentError(f"lengths[{i}] is {_show(size)}; a span's length is a whole number >= 1")
        segments += [kept, size] if kept else [size]
        kept_from = end
    tail = text[kept_from:]
    if tail:
        problem = _kept_problem(tokenizer, tail)
        if problem:
            raise SegmentError(f"the text after span {len(spans) - 1} ({_show(tail)}) {problem}")
        segments.append(tail)
    return segments


def _piece_bytes(tokenizer: Tokenizer, tokens: list[int]) -> bytes:
    if isinstance(tokenizer, GPT2Tokenizer):  # GPT-2 tokens are bytes, not characters
        return tokenizer.encoding.decode_bytes(tokens)
    return tokenizer.decode(tokens).encode("utf-8")


def text_and_spans(tokenizer: Tokenizer, row: Sequence[int], gaps: Sequence[tuple[int, int]],
                   mask_id: int | None = None, placeholder: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The text of a token row and the character ranges [start, end) of its gaps in that text.

    The text equals the whole-row decode (`tokenizer.decode(row, mask_id, placeholder)`). Kept text
    is valid on its own, so it decodes to itself at its place. GPT-2 tokens are bytes: a gap's
    unfinished multi-byte character before kept text (or the end) becomes U+FFFD inside that gap, as
    in the whole decode; a character whose bytes straddle two adjacent gaps belongs to the later one.
    Mask tokens become `placeholder` (dropped when None), as in the tokenizer's decode."""
    row = [int(t) for t in row]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[str] = []

    def feed(tokens: list[int], final: bool) -> None:
        pieces.append(decoder.decode(_piece_bytes(tokenizer, tokens) if tokens else b"", final=final))

    def feed_gap(tokens: list[int], final: bool) -> None:
        run: list[int] = []
        for tok in tokens:
            if mask_id is not None and tok == mask_id:  # the whole-row decode decodes each run on its own
                feed(run, final=True)
                pieces.append(placeholder or "")
                run = []
            else:
                run.append(tok)
        feed(run, final=final)

    spans, position = [], 0
    for gap_index, (start, end) in enumerate(gaps):
        if start > position:
            feed(row[position:start], final=True)  # kept text: complete characters, decoder left clean
        begin = sum(map(len, pieces))
        next_is_gap = gap_index + 1 < len(gaps) and gaps[gap_index + 1][0] == end
        feed_gap(row[start:end], final=not next_is_gap)
        spans.append((begin, sum(map(len, pieces))))
        position = end
    if position < len(row):
        feed(row[position:], final=True)
    return "".join(pieces), spans

"""Segments: kept text and gaps anywhere on the canvas, rewriting spans, and the text and gap spans of a row."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sedd_core
from sedd_core.canvas import (
    MAX_SEGMENTS,
    SegmentError,
    lay_out,
    rewrite_segments,
    text_and_spans,
    tokenize_kept,
)
from sedd_core.generation import GenerationError, iterate, make_job
from sedd_core.tokenizers import CharTokenizer, load_gpt2

from helpers import sedd

PINNED = Path(__file__).parent / "data" / "reference" / "tiny-five-pinned"
CHARS = CharTokenizer()


@pytest.fixture(scope="module")
def gpt2(gpt2_vocab):
    return load_gpt2(vocab=gpt2_vocab)


def run_job(lm, **request):
    job = make_job(lm, **request)
    for _ in iterate(lm, job):
        pass
    return job


def pinned_segments(pins: dict[str, str], length: int) -> list:
    """The authors' proj_fun pins {position: character} as segments of a `length`-character canvas."""
    segments, position = [], 0
    for where, char in sorted((int(k), v) for k, v in pins.items()):
        if where > position:
            segments.append(where - position)
        segments.append(char)
        position = where + 1
    if position < length:
        segments.append(length - position)
    return segments


# ---- the distribution against the authors' sampler with pinned positions ----------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in PINNED.glob("*.json")))
def test_pinned_shares_match_the_authors_sampler(lm, total_variation, name):
    """2,000 samples with the characters the authors' proj_fun pinned, given as segments: TV over the frequent
    strings within sampling noise of their 2,000 (the bound of tests/test_generation.py)."""
    reference = json.loads((PINNED / f"{name}.json").read_text())
    segments = pinned_segments(reference["pins"], lm.length)
    n = 2000
    texts = sedd_core.generate(lm, segments=segments, num_samples=n, steps=reference["steps"],
                               predictor=reference["predictor"], seed=1234)
    ours, theirs = Counter(texts), reference["shares"]
    assert all(t[int(k)] == v for t in texts for k, v in reference["pins"].items())
    assert total_variation(ours, theirs, n, min_share=0.005) < 0.06
    assert ours.most_common(1)[0][0] == max(theirs, key=theirs.get)


def test_pinned_segments_follow_the_positions():
    assert pinned_segments({"5": " "}, 12) == [5, " ", 6]
    assert pinned_segments({"10": "o", "2": "s"}, 12) == [2, "s", 7, "o", 1]
    assert pinned_segments({"0": "a", "11": "b"}, 12) == ["a", 10, "b"]


# ---- kept text lands where the segments put it ------------------------------------------------------------
def test_char_model_keeps_text_at_its_positions(lm):
    segments = ["h", 3, " w", 2, "!"]
    job = run_job(lm, segments=segments, num_samples=6, steps=8, seed=5)
    assert job.length == 9 and job.gaps == ((1, 4), (6, 8))
    for row in job.x.tolist():
        text, spans = text_and_spans(lm.tokenizer, row, job.gaps, lm.mask_id)
        assert text == lm.tokenizer.decode(row) and len(text) == 9
        assert text[0] == "h" and text[4:6] == " w" and text[8] == "!"
        assert spans == [(1, 4), (6, 8)]


def test_prefix_and_suffix_are_shorthand_for_segments(lm):
    request = dict(num_samples=4, steps=8, seed=21)
    assert (sedd_core.generate(lm, prefix="sc", suffix="os", **request)
            == sedd_core.generate(lm, segments=["sc", 8, "os"], **request))
    assert (sedd_core.generate(lm, length=7, prefix="d", **request)
            == sedd_core.generate(lm, segments=["d", 6, ""], **request))
    job = make_job(lm, prefix="sc", suffix="os")
    assert job.gaps == ((2, 10),)
    assert make_job(lm).gaps == ((0, 12),) and make_job(lm).fixed is None


def test_the_shorthand_tokenizes_prefix_and_suffix_once(lm, monkeypatch):
    encoded = []
    encode = CharTokenizer.encode
    monkeypatch.setattr(CharTokenizer, "encode", lambda self, text: encoded.append(text) or encode(self, text))
    job = make_job(lm, prefix="sc", suffix="os")
    assert sorted(encoded) == ["os", "sc"]
    assert job.fixed_tokens.tolist()[:2] == encode(CHARS, "sc") and job.gaps == ((2, 10),)


def test_gpt2_model_keeps_text_in_the_middle_token_exact(tmp_path, write_tiny_gpt2_model, gpt2_vocab):
    lm = sedd_core.load(write_tiny_gpt2_model(tmp_path / "gpt2", vocab_file=gpt2_vocab, length=24), device="cpu")
    segments = ["The", 5, " quick brown", 4, " fox jumps."]
    job = run_job(lm, segments=segments, num_samples=3, steps=6, seed=2)
    pieces = [lm.tokenizer.encode(s) for s in segments if isinstance(s, str)]
    starts = [0, 1 + 5, 1 + 5 + len(pieces[1]) + 4]
    assert job.length == sum(map(len, pieces)) + 9
    for row in job.x.tolist():
        assert lm.mask_id not in row
        for start, ids in zip(starts, pieces):
            assert row[start:start + len(ids)] == ids
        text, spans = text_and_spans(lm.tokenizer, row, job.gaps, lm.mask_id)
        assert text == lm.tokenizer.decode(row)
        (a, b), (c, d) = spans
        assert text[:a] == "The" and text[b:c] == " quick brown" and text[d:] == " fox jumps."


# ---- text_and_spans: whole-row decode, kept text in place, bytes split across gaps -----------------------
def test_char_rows_give_spans_and_placeholders():
    row = CHARS.encode("ab") + [CHARS.PAD] + CHARS.encode("cd") + [98, 98] + CHARS.encode("e")
    text, spans = text_and_spans(CHARS, row, [(2, 5), (5, 7)], mask_id=98, placeholder="_")
    assert text == "abcd__e" == CHARS.decode(row, 98, "_")
    assert spans == [(2, 4), (4, 6)]  # the PAD token decodes to nothing


def test_gpt2_partial_characters_follow_the_whole_decode(gpt2):
    byte = {b: gpt2.encoding.encode_single_token(bytes([b])) for b in (0xE2, 0x82, 0xAC)}
    kept = gpt2.encode("ok")
    k = len(kept)
    # "€" is E2 82 AC: split over two adjacent gaps, it belongs to the later gap.
    row = kept + [byte[0xE2]] + [byte[0x82], byte[0xAC]] + kept
    text, spans = text_and_spans(gpt2, row, [(k, k + 1), (k + 1, k + 3)])
    assert text == gpt2.decode(row) == "ok€ok"
    assert spans == [(2, 2), (2, 3)]
    # An unfinished character before kept text is U+FFFD inside its gap; the kept text is intact.
    row = kept + [byte[0xE2], byte[0x82]] + kept
    text, spans = text_and_spans(gpt2, row, [(k, k + 2)])
    assert text == gpt2.decode(row) == "ok\ufffdok" and spans == [(2, 3)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["ok", " é", "€!", "\n", "x y"]),
                          st.lists(st.sampled_from(list(range(0xC2, 0xF0)) + list(range(0x80, 0xC0))
                                                   + [300, 1000, 50256]), min_size=1, max_size=4)),
                min_size=1, max_size=6))
def test_gpt2_kept_text_decodes_in_place_whatever_the_gaps_hold(gpt2, parts):
    """Random gap tokens, single bytes of broken UTF-8 included: the text is the whole-row decode, kept text
    sits between the spans unchanged."""
    tok = gpt2
    single = {}
    row, gaps = [], []
    for part in parts:
        if isinstance(part, str):
            row += tok.encode(part)
        else:
            ids = [t if t >= 300 else single.setdefault(t, tok.encoding.encode_single_token(bytes([t]))) for t in part]
            gaps.append((len(row), len(row) + len(ids)))
            row += ids
    text, spans = text_and_spans(tok, row, gaps)
    assert text == tok.decode(row)
    kept, cursor = [], 0
    for start, end in spans:
        kept.append(text[cursor:start])
        cursor = end
    kept.append(text[cursor:])
    expected, current = [], ""
    for part in parts:
        if isinstance(part, str):
            current += part
        else:
            expected.append(current)
            current = ""
    expected.append(current)
    assert kept == expected


# ---- bad segments: clear errors naming the segment ----------------------------------------------------------
@pytest.mark.parametrize(("segments", "message"), [
    ([], "segments is empty"),
    ("abc", "must be a list"),
    (["a", 0, "b"], "segment 1 is a gap of 0 tokens"),
    ([3, -2], "segment 1 is a gap of -2 tokens"),
    (["a", True], r"segment 1 is True \(bool\)"),
    ([2.0, "a"], r"segment 0 is 2.0 \(float\)"),
    (["a", None], r"segment 1 is None \(NoneType\)"),
    (["a", ["b"]], r"segment 1 is \['b'\] \(list\)"),
    (["just text"], "hold no gap"),
    (["a", 3, "é", 2, "b€"], r"segment 2 \('é'\) holds characters .* 'é'; segment 4 \('b€'\) holds .* '€'"),
    (["abc", 5, "de", 4], r"the canvas takes 14 tokens but the model's length is 12: .* segment 3 \(a gap of 4"),
    ([3, 3, 3, "a" * 8], r"canvas takes 17 .* segment 3 \(8 tokens of text\)"),
    ([1, "a"] * (MAX_SEGMENTS // 2) + [1], f"segment {MAX_SEGMENTS} \\(1\\) is one too many: at most 64"),
])
def test_bad_segments_name_the_segment(segments, message):
    with pytest.raises(SegmentError, match=message):
        lay_out(CHARS, segments, max_length=12 if len(segments) <= MAX_SEGMENTS else 200)


def test_empty_strings_take_no_positions():
    layout = lay_out(CHARS, ["", "ab", "", 3, ""], max_length=12)
    assert layout.length == 5 and layout.fixed == [True, True, False, False, False] and layout.gaps == ((2, 5),)
    assert len(lay_out(CHARS, [1, "a"] * 32, max_length=64).gaps) == 32  # exactly MAX_SEGMENTS is fine


def test_gpt2_refuses_text_that_does_not_survive_encoding(gpt2):
    with pytest.raises(SegmentError, match=r"segment 0 \('a\\ud800'\) does not decode back to itself"):
        lay_out(gpt2, ["a\ud800", 2], max_length=24)


def test_text_tokenized_beforehand_lays_out_as_the_text(gpt2):
    kept = tokenize_kept(CHARS, "ab")
    assert kept.tokens == tuple(CHARS.encode("ab"))
    assert lay_out(CHARS, [kept, 3, tokenize_kept(CHARS, "")], max_length=12) == lay_out(CHARS, ["ab", 3, ""], 12)
    with pytest.raises(SegmentError, match=r"'a\\ud800' does not decode back to itself"):
        tokenize_kept(gpt2, "a\ud800")


def test_make_job_reports_segment_errors_as_generation_errors(lm):
    with pytest.raises(GenerationError, match="give either segments or prefix/suffix/length, not both"):
        make_job(lm, segments=["a", 3], prefix="x")
    with pytest.raises(GenerationError, match="not both"):
        make_job(lm, segments=["a", 3], length=4)
    with pytest.raises(GenerationError, match="segment 1 is a gap of 0 tokens"):
        make_job(lm, segments=["a", 0])


# ---- rewriting spans ----------------------------------------------------------------------------------------
def test_rewrite_keeps_everything_outside_the_spans():
    assert rewrite_segments(CHARS, "hello world!", [[6, 11]]) == ["hello ", 5, "!"]
    assert rewrite_segments(CHARS, "hello world!", [[0, 5], [5, 6], [11, 12]]) == [5, 1, "world", 1]
    assert rewrite_segments(CHARS, "hello world!", [[6, 11]], lengths=[2]) == ["hello ", 2, "!"]


def test_rewrite_span_may_cut_a_gpt2_token(gpt2):
    text = "hello world"
    assert len(gpt2.encode("hello")) == 1  # the span below cuts that token
    segments = rewrite_segments(gpt2, text, [[2, 4]])
    assert segments == ["he", len(gpt2.encode("ll")), "o world"]
    layout = lay_out(gpt2, segments, max_length=24)
    row = [t if kept else gpt2.encode("LL")[0] for t, kept in zip(layout.tokens, layout.fixed)]
    assert text_and_spans(gpt2, row, layout.gaps)[0].replace("LL", "ll") == text


def test_rewrite_refuses_kept_text_that_does_not_survive_gpt2(gpt2):
    """Offsets count code points, so no span can cut a UTF-8 character; a lone surrogate cannot be kept."""
    assert rewrite_segments(gpt2, "a\u20acb\U0001f600c", [[1, 2], [3, 4]]) == ["a", 1, "b", len(gpt2.encode("\U0001f600")), "c"]
    with pytest.raises(SegmentError, match=r"the text after span 0 \('\\ud800b'\) does not decode back to itself"):
        rewrite_segments(gpt2, "a\ud800b", [[0, 1]])


@pytest.mark.parametrize(("spans", "lengths", "message"), [
    ([], None, "non-empty list"),
    ([[3, 3]], None, r"span 0 \[3, 3\) is out of range"),
    ([[5, 2]], None, r"span 0 \[5, 2\) is out of range"),
    ([[-1, 2]], None, "span 0 .* out of range"),
    ([[0, 2], [10, 13]], None, r"span 1 \[10, 13\) is out of range: need 0 <= start < end <= 12"),
    ([[0, 4], [3, 6]], None, r"span 1 \[3, 6\) overlaps or comes before span 0"),
    ([[6, 8], [0, 2]], None, "span 1 .* overlaps or comes before span 0"),
    ([[0, 2.5]], None, r"span 0 is \[0, 2.5\]; a span is \[start, end\]"),
    ([[0, 2, 3]], None, "span 0 is"),
    ([[0, 2]], [1, 2], "lengths has 2 entries for 1 spans"),
    ([[0, 2]], [0], r"lengths\[0\] is 0"),
])
def test_bad_rewrite_spans_name_the_span(spans, lengths, message):
    with pytest.raises(SegmentError, match=message):
        rewrite_segments(CHARS, "hello world!", spans, lengths)


def test_rewrite_refuses_kept_text_the_vocabulary_cannot_encode():
    with pytest.raises(SegmentError, match=r"the text after span 0 \('llé'\) holds .* 'é'"):
        rewrite_segments(CHARS, "hellé", [[0, 2]])
    # unknown characters inside a span are fine: they are replaced
    assert rewrite_segments(CHARS, "héllo", [[1, 2]]) == ["h", 1, "llo"]


def test_rewrite_run_changes_only_the_span(lm):
    text = "hello world!"
    job = run_job(lm, segments=rewrite_segments(lm.tokenizer, text, [[2, 4], [6, 9]]),
                  num_samples=4, steps=8, seed=3)
    for row in job.x.tolist():
        new, spans = text_and_spans(lm.tokenizer, row, job.gaps, lm.mask_id)
        assert spans == [(2, 4), (6, 9)]
        assert new[:2] + new[4:6] + new[9:] == "he" + "o " + "ld!"


# ---- the command line --------------------------------------------------------------------------------------
def test_cli_infill_with_segments(tiny_five):
    out = sedd("infill", "--model", str(tiny_five), "--segments", '[2, "s", 7, "o", 1]', "--steps", "8",
               "--num-samples", "2", "--seed", "4", "--json")
    assert out.returncode == 0, out.stderr
    texts = [json.loads(line)["text"] for line in out.stdout.splitlines()]
    assert len(texts) == 2 and all(len(t) == 12 and t[2] == "s" and t[10] == "o" for t in texts)


@pytest.mark.parametrize(("args", "message"), [
    (("--segments", '["ab", 4'), "--segments is not valid JSON"),
    (("--segments", '{"a": 1}'), "--segments must be a JSON list"),
    (("--segments", '["ab", 0]'), "segment 1 is a gap of 0 tokens"),
    (("--segments", '["ab", 4]', "--prefix", "x"), "not both"),
])
def test_cli_bad_segments_exit_2(tiny_five, args, message):
    out = sedd("infill", "--model", str(tiny_five), *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr

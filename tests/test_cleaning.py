"""Cleaning steps and quality filters on known inputs (maxlm/data/cleaning.py)."""

import random

import pytest

from maxlm.config import CleaningConfig, QualityConfig
from maxlm.data import cleaning


def words(n, seed=0):
    """`n` made-up five-letter words, practically never repeating."""
    r = random.Random(seed)
    return [
        "".join(r.choice("bdfgklmnprstvz") + r.choice("aeiou") for _ in range(2)) + r.choice("nrs")
        for _ in range(n)
    ]


def lines_of(ws, per_line=10):
    return "\n".join(" ".join(ws[i : i + per_line]) for i in range(0, len(ws), per_line))


def test_normalize_forms_and_control_characters():
    text = "cafe\u0301 \ufb01ne\x00\x1b[0m\r\n\ttab\x7f\x85end\n"
    assert cleaning.normalize(text, CleaningConfig()) == "caf\u00e9 \ufb01ne[0m\n\ttabend\n"
    assert cleaning.normalize(text, CleaningConfig(normalization="NFKC")).startswith("café fine")
    untouched = CleaningConfig(normalization="none", strip_control_chars=False)
    assert cleaning.normalize(text, untouched) == text


def test_lone_surrogates_become_replacement_characters():
    assert cleaning.replace_surrogates("a\ud83db\udc00") == "a\ufffdb\ufffd"


def test_split_oversized_cuts_after_newlines():
    text = "aaaa\nbbbb\ncc\n" + "d" * 12 + "\nee"
    pieces = cleaning.split_oversized(text, 10)
    assert "".join(pieces) == text
    assert pieces == ["aaaa\nbbbb\n", "cc\n", "d" * 10, "dd\nee"]
    assert cleaning.split_oversized("short", 10) == ["short"]


def test_remove_lines_drops_listed_long_lines_only():
    boilerplate = {cleaning.line_hash("Subscribe to our newsletter")}
    text = "intro\n  Subscribe to our newsletter  \nbody\nSubscribe to our newsletter"
    assert cleaning.remove_lines(text, boilerplate) == ("intro\nbody\n", 2)
    assert cleaning.boilerplate_candidates(text) == boilerplate  # short lines never count


def test_clean_counts_boilerplate_and_splits():
    boilerplate = {cleaning.line_hash("Click here to accept cookies")}
    text = "Click here to accept cookies\n" + "x" * 25
    cleaned = cleaning.clean(text, CleaningConfig(max_chars=10), boilerplate)
    assert cleaned == cleaning.Cleaned(["x" * 10, "x" * 10, "x" * 5], 1)


def _good():
    """100 words, every 25th an English stop word (Gopher wants at least two distinct ones)."""
    return [("the", "of")[(i // 25) % 2] if i % 25 == 0 else w for i, w in enumerate(words(100))]


def _filter_cases():
    """Documents that each fail exactly one filter, keyed by the filter's name."""
    w = _good()
    dup_phrase = words(10, seed=1)
    return {
        "word_count": lines_of(w[:20]),
        "mean_word_length": lines_of([x[:2] for x in w]),
        "symbol_word_ratio": lines_of([("#" + x if i % 6 == 0 else x) for i, x in enumerate(w)]),
        "bullet_lines": "\n".join("• " + line for line in lines_of(w).split("\n")),
        "ellipsis_lines": "\n".join(
            line + ("…" if i < 4 else "") for i, line in enumerate(lines_of(w).split("\n"))
        ),
        "alpha_words": lines_of([("1234" if i % 10 < 3 else x) for i, x in enumerate(w)]),
        "stop_words": lines_of(words(100)),
        "duplicate_lines": "\n".join([" ".join(w[:10])] * 5 + lines_of(w[10:60]).split("\n")),
        "duplicate_line_chars": "\n".join(
            [" ".join(w[:30])] * 2 + lines_of(w[30:70], per_line=5).split("\n")
        ),
        "top_ngram_chars": lines_of(
            [v for i in range(20) for v in ("alpha", "betas", *w[2 * i : 2 * i + 2])], 4
        ),
        "duplicate_ngram_chars": lines_of(w[:35] + dup_phrase + w[35:70] + dup_phrase + w[70:75]),
    }


def test_good_document_passes_every_filter():
    assert (
        cleaning.rejection(lines_of(_good()), CleaningConfig(), QualityConfig(enabled=True)) is None
    )


@pytest.mark.parametrize("name", cleaning.QUALITY_FILTERS)
def test_each_filter_rejects_its_case_under_its_name(name):
    text = _filter_cases()[name]
    assert cleaning.rejection(text, CleaningConfig(), QualityConfig(enabled=True)) == name
    assert cleaning.rejection(text, CleaningConfig(), QualityConfig(enabled=False)) is None


def test_word_count_upper_bound_and_thresholds_are_configurable():
    text = lines_of(_good())
    assert (
        cleaning.rejection(text, CleaningConfig(), QualityConfig(enabled=True, max_words=99))
        == "word_count"
    )
    lenient = QualityConfig(enabled=True, max_duplicate_lines=0.5, max_duplicate_line_chars=1.0,
                            max_duplicate_ngram_chars={}, max_top_ngram_chars={})  # fmt: skip
    assert cleaning.rejection(_filter_cases()["duplicate_lines"], CleaningConfig(), lenient) is None


def test_empty_and_too_short_come_before_quality():
    quality = QualityConfig(enabled=True)
    assert cleaning.rejection(" \n\t ", CleaningConfig(min_chars=0), quality) == "empty"
    assert cleaning.rejection("tiny text", CleaningConfig(min_chars=10), quality) == "too_short"
    assert cleaning.rejection("tiny text", CleaningConfig(min_chars=9), quality) == "word_count"

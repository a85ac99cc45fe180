"""Document cleaning and heuristic quality filters for `python -m maxlm.data.prepare`:
Unicode normalization, control characters, boilerplate lines, splitting oversized documents,
and the Gopher (Rae et al. 2021, appendix A) / RefinedWeb (Penedo et al. 2023) filters."""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Set
from dataclasses import dataclass

from maxlm.config import CleaningConfig, QualityConfig

BOILERPLATE_MIN_CHARS = 10  # shorter lines ("}", "Thanks!") repeat innocently
# C0 and C1 controls and DEL, except \t (0x09) and \n (0x0a); \r goes, so CRLF becomes LF.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATES = re.compile("[\ud800-\udfff]")  # from JSON escapes; not encodable as UTF-8
_LINES = re.compile(r"[^\n]*\n|[^\n]+")  # lines with their newline; the last may lack one
_BULLETS = ("•", "●", "◦", "▪", "‣", "⁃", "-", "*", "·")
_ELLIPSES = ("...", "…")
_ALPHA = re.compile(r"[^\W\d_]")  # a letter: a word character that is no digit or underscore


# --------------------------------------------------------------------------- cleaning


def replace_surrogates(text: str) -> str:
    """`text` with lone surrogates (which tokenizers reject) replaced by U+FFFD."""
    return _SURROGATES.sub("\ufffd", text)


def normalize(text: str, cfg: CleaningConfig) -> str:
    """`text` in the configured Unicode normal form, control characters stripped if asked."""
    if cfg.normalization != "none":
        text = unicodedata.normalize(cfg.normalization, text)
    return _CONTROL.sub("", text) if cfg.strip_control_chars else text


def line_hash(line: str) -> int:
    """A 64-bit key of a line without surrounding whitespace (boilerplate counting)."""
    digest = hashlib.blake2b(line.strip().encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def boilerplate_candidates(text: str) -> set[int]:
    """Keys of the distinct lines of `text` long enough to count as boilerplate."""
    return {
        line_hash(line) for line in text.split("\n") if len(line.strip()) >= BOILERPLATE_MIN_CHARS
    }


def remove_lines(text: str, boilerplate: Set[int]) -> tuple[str, int]:
    """`text` without the lines whose key is in `boilerplate`, and how many were removed."""
    if not boilerplate:
        return text, 0
    lines = _LINES.findall(text)
    kept = [
        line
        for line in lines
        if len(line.strip()) < BOILERPLATE_MIN_CHARS or line_hash(line) not in boilerplate
    ]
    return "".join(kept), len(lines) - len(kept)


def split_oversized(text: str, max_chars: int) -> list[str]:
    """Pieces of at most `max_chars` that concatenate to `text`, cut after a newline where
    possible (a single longer line is cut every `max_chars` characters)."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in _LINES.findall(text):
        for start in range(0, len(line), max_chars):
            part = line[start : start + max_chars]
            if current and size + len(part) > max_chars:
                pieces.append("".join(current))
                current, size = [], 0
            current.append(part)
            size += len(part)
    pieces.append("".join(current))
    return pieces


@dataclass(frozen=True)
class Cleaned:
    """One document after cleaning: its pieces (one unless it was oversized) and how many
    boilerplate lines were removed from it."""

    pieces: list[str]
    boilerplate_lines: int


def clean(text: str, cfg: CleaningConfig, boilerplate: Set[int] = frozenset()) -> Cleaned:
    """Normalize, strip control characters and boilerplate lines, split if oversized."""
    text, removed = remove_lines(normalize(text, cfg), boilerplate)
    return Cleaned(split_oversized(text, cfg.max_chars), removed)


# --------------------------------------------------------------------------- filters


def rejection(text: str, cleaning: CleaningConfig, quality: QualityConfig) -> str | None:
    """Why a cleaned piece is dropped ("empty", "too_short" or a QUALITY_FILTERS name), or
    None to keep it."""
    if not text.strip():
        return "empty"
    if len(text) < cleaning.min_chars:
        return "too_short"
    if not quality.enabled:
        return None
    doc = _Stats.of(text)
    return next((name for name in QUALITY_FILTERS if _CHECKS[name](doc, quality)), None)


@dataclass(frozen=True)
class _Stats:
    text: str
    words: list[str]
    lines: list[str]  # non-blank, without surrounding whitespace

    @staticmethod
    def of(text: str) -> _Stats:
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        return _Stats(text, text.split(), lines)

    @functools.cached_property
    def word_chars(self) -> int:
        return sum(len(w) for w in self.words)


def _word_count(doc: _Stats, cfg: QualityConfig) -> bool:
    return not cfg.min_words <= len(doc.words) <= cfg.max_words


def _mean_word_length(doc: _Stats, cfg: QualityConfig) -> bool:
    mean = doc.word_chars / max(len(doc.words), 1)
    return not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length


def _symbol_word_ratio(doc: _Stats, cfg: QualityConfig) -> bool:
    # Gopher bounds the hash symbol and the ellipsis each on its own.
    words = max(len(doc.words), 1)
    hashes = doc.text.count("#")
    ellipses = sum(doc.text.count(e) for e in _ELLIPSES)
    return max(hashes, ellipses) / words > cfg.max_symbol_word_ratio


def _bullet_lines(doc: _Stats, cfg: QualityConfig) -> bool:
    bullets = sum(line.startswith(_BULLETS) for line in doc.lines)
    return bullets / max(len(doc.lines), 1) > cfg.max_bullet_lines


def _ellipsis_lines(doc: _Stats, cfg: QualityConfig) -> bool:
    ellipses = sum(line.endswith(_ELLIPSES) for line in doc.lines)
    return ellipses / max(len(doc.lines), 1) > cfg.max_ellipsis_lines


def _alpha_words(doc: _Stats, cfg: QualityConfig) -> bool:
    alpha = sum(1 for w in doc.words if _ALPHA.search(w))
    return alpha / max(len(doc.words), 1) < cfg.min_alpha_words


# Gopher's stop words: English text of any quality uses at least two of them.
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})


def _stop_words(doc: _Stats, cfg: QualityConfig) -> bool:
    if cfg.min_stop_words == 0:
        return False
    found = {w.lower().strip(".,;:!?\"'()") for w in doc.words} & GOPHER_STOP_WORDS
    return len(found) < cfg.min_stop_words


def _repeats(items: list[str]) -> list[str]:
    """Every occurrence of an item after its first."""
    seen: set[str] = set()
    repeats = []
    for item in items:
        if item in seen:
            repeats.append(item)
        seen.add(item)
    return repeats


def _duplicate_lines(doc: _Stats, cfg: QualityConfig) -> bool:
    return len(_repeats(doc.lines)) / max(len(doc.lines), 1) > cfg.max_duplicate_lines


def _duplicate_line_chars(doc: _Stats, cfg: QualityConfig) -> bool:
    repeated = sum(len(line) for line in _repeats(doc.lines))
    return repeated / max(sum(len(line) for line in doc.lines), 1) > cfg.max_duplicate_line_chars


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _top_ngram_chars(doc: _Stats, cfg: QualityConfig) -> bool:
    # Characters are word characters (whitespace excluded) on both sides of the ratio.
    total = max(doc.word_chars, 1)
    for n, limit in sorted(cfg.max_top_ngram_chars.items()):
        counts = Counter(_ngrams(doc.words, n))
        if not counts:
            continue
        gram, count = counts.most_common(1)[0]
        if count > 1 and sum(len(w) for w in gram) * count / total > limit:
            return True
    return False


def _duplicate_ngram_chars(doc: _Stats, cfg: QualityConfig) -> bool:
    # Every occurrence of an n-gram seen more than once covers its words; a word covered by
    # overlapping n-grams counts once.
    total = max(doc.word_chars, 1)
    for n, limit in sorted(cfg.max_duplicate_ngram_chars.items()):
        grams = _ngrams(doc.words, n)
        counts = Counter(grams)
        covered = [False] * len(doc.words)
        for i, gram in enumerate(grams):
            if counts[gram] > 1:
                covered[i : i + n] = [True] * n
        if sum(len(w) for w, c in zip(doc.words, covered, strict=True) if c) / total > limit:
            return True
    return False


# Checked in this order; a piece is counted under the first that rejects it.
_CHECKS: dict[str, Callable[[_Stats, QualityConfig], bool]] = {
    "word_count": _word_count,
    "mean_word_length": _mean_word_length,
    "symbol_word_ratio": _symbol_word_ratio,
    "bullet_lines": _bullet_lines,
    "ellipsis_lines": _ellipsis_lines,
    "alpha_words": _alpha_words,
    "stop_words": _stop_words,
    "duplicate_lines": _duplicate_lines,
    "duplicate_line_chars": _duplicate_line_chars,
    "top_ngram_chars": _top_ngram_chars,
    "duplicate_ngram_chars": _duplicate_ngram_chars,
}
QUALITY_FILTERS = tuple(_CHECKS)

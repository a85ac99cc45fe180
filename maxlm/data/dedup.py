"""Exact and near-duplicate removal: a digest of the whitespace-normalized text, then MinHash
signatures of word shingles indexed by locality-sensitive hashing (`datasketch`). Workers
compute keys and signatures; one `Deduplicator` decides in input order, keeping the first."""

from __future__ import annotations

import hashlib

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from maxlm.config import DedupConfig

# Fixed so every process and every run draws the same permutations; the scheme is named
# because datasketch 2 changed its default.
MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"
_UPDATE_BATCH = 4096  # shingles hashed at once: bounds the (batch, num_perm) temporaries


def exact_key(text: str) -> bytes:
    """A 16-byte digest of `text` with runs of whitespace collapsed to one space."""
    return hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()


def shingles(text: str, n: int) -> set[str]:
    """The distinct runs of `n` lowercased words (one shingle when there are fewer)."""
    words = text.lower().split()
    return {" ".join(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


class MinHasher:
    """MinHash signatures of texts' word shingles, reproducible across processes."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        # Drawing the permutations costs more than hashing a short text: draw them once.
        self._prototype = MinHash(cfg.num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME)

    def __call__(self, text: str) -> np.ndarray:
        """The signature (num_perm hash values) of `text`."""
        minhash = MinHash(
            self.cfg.num_perm,
            seed=MINHASH_SEED,
            permutations=self._prototype.permutations,
            scheme=MINHASH_SCHEME,
        )
        items = [s.encode() for s in sorted(shingles(text, self.cfg.shingle_words))]
        for start in range(0, len(items), _UPDATE_BATCH):
            minhash.update_batch(items[start : start + _UPDATE_BATCH])
        return np.asarray(minhash.hashvalues).copy()


class Deduplicator:
    """Decides, piece by piece in input order, whether a piece repeats an earlier one."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self._seen: set[bytes] = set()
        self._lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        self._kept = 0

    def check(self, key: bytes, signature: np.ndarray | None) -> str | None:
        """ "exact_duplicate", "near_duplicate", or None (kept: later pieces are compared
        with it). `signature` may be None only when near-duplicate removal is off."""
        if self.cfg.exact:
            if key in self._seen:
                return "exact_duplicate"
            self._seen.add(key)
        if self.cfg.near:
            assert signature is not None, "near-duplicate removal needs a signature"
            minhash = LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme=MINHASH_SCHEME)
            # LSH candidates are only ever kept pieces: the first of a group stays.
            if self._lsh.query(minhash):
                return "near_duplicate"
            self._lsh.insert(self._kept, minhash, check_duplication=False)
        self._kept += 1
        return None

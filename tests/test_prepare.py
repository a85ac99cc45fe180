"""Offline preprocessing (maxlm/data/prepare.py, dedup.py): counts that add up, shards that hold
exactly the surviving documents' tokens, no-op reruns, resumption, workers, the command line."""

import json
import random

import numpy as np
import pytest
import tokenizers
import yaml
from array_record.python.array_record_module import ArrayRecordReader
from tokenizers import decoders, models, pre_tokenizers, trainers

from maxlm.config import DedupConfig, SourceConfig, from_dict
from maxlm.data import prepare, sources, tokenizer as tokenizer_lib
from maxlm.data.dedup import Deduplicator, MinHasher, exact_key
from maxlm.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer


def words(n, seed):
    """`n` made-up five-letter words, practically never repeating."""
    r = random.Random(seed)
    return [
        "".join(r.choice("bdfgklmnprstvz") + r.choice("aeiou") for _ in range(2)) + r.choice("nrs")
        for _ in range(n)
    ]


def text(n, seed, per_line=12):
    ws = words(n, seed)
    return "\n".join(" ".join(ws[i : i + per_line]) for i in range(0, n, per_line)) + "\n"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text(200, seed) for seed in range(20)], trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


# Each corpus file and what becomes of it (files are read in sorted order).
A = text(200, seed=1)
NEAR = A.replace(A.split()[100], "zzzzz", 1)
LONG = text(400, seed=3, per_line=8)  # 50 lines of 48 characters: 2 pieces of <= 2,000
CORPUS = {
    "01_good.txt": A.encode(),
    "02_exact.txt": ("  " + A.replace("\n", " \n  ") + "\n\n").encode(),  # exact_duplicate
    "03_near.txt": NEAR.encode(),  # near_duplicate
    "04_other.txt": text(150, seed=2).encode(),
    "05_empty.txt": b" \n\t\n",  # empty
    "06_short.txt": b"hi",  # too_short
    "07_bad.txt": b"cafe\xcc\x81 caf\xc3 ok \xff\xfe end\x00\x1b\r\n",  # 3 replacement chars
    "08_long.txt": LONG.encode(),  # split in two
}
BAD_CLEAN = "caf\u00e9 caf\ufffd ok \ufffd\ufffd end\n"
KEPT = [A, text(150, seed=2), BAD_CLEAN, LONG[: 41 * 48], LONG[41 * 48 :]]


def write_corpus(root, files=CORPUS):
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return str(root / "*.txt")


def make_config(tmp_path, tokenizer_path, pattern, tokenizer_kind="huggingface", **prepare_keys):
    return from_dict(
        {
            "data": {
                "sources": {"web": {"kind": "text_files", "paths": [pattern]}},
                "tokenizer": {"kind": tokenizer_kind, "path": str(tokenizer_path)},
            },
            "prepare": {
                "output_dir": str(tmp_path / "out"),
                "num_workers": 1,
                "documents_per_shard": 2,
                "cleaning": {"min_chars": 5, "max_chars": 2000},
                **prepare_keys,
            },
        }
    )


def read_tokens(directory):
    """Every record of the shards its manifest lists, as token-id lists."""
    manifest = json.loads((directory / "manifest.json").read_text())
    records = []
    for shard in manifest["shards"]:
        reader = ArrayRecordReader(str(directory / shard["file"]))
        found = reader.read_all()
        reader.close()
        assert len(found) == shard["documents"]
        records += [np.frombuffer(r, dtype="<u4").tolist() for r in found]
    return records


def shard_files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.array_record"))}


def assert_counts_add_up(counts):
    pieces = counts["documents_in"] + counts["split_extra"]
    assert pieces == counts["documents_out"] + sum(counts["dropped"].values())


def without_created(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["created"]
    return manifest


def test_end_to_end_counts_and_tokens(tmp_path, tokenizer_path):
    cfg = make_config(tmp_path, tokenizer_path, write_corpus(tmp_path / "corpus"))
    manifest = prepare.prepare(cfg)["web"]
    counts = manifest["counts"]
    dropped = {k: v for k, v in counts["dropped"].items() if v}
    assert dropped == {"exact_duplicate": 1, "near_duplicate": 1, "empty": 1, "too_short": 1}
    assert (counts["documents_in"], counts["documents_out"]) == (8, 5)
    assert (counts["split_oversized"], counts["split_extra"]) == (1, 1)
    assert counts["replacement_chars"] == 3
    assert_counts_add_up(counts)
    tokenizer = HuggingFaceTokenizer(tokenizer_path)
    assert read_tokens(tmp_path / "out" / "web") == tokenizer.encode_batch(KEPT)
    assert counts["tokens"] == sum(len(ids) for ids in tokenizer.encode_batch(KEPT))
    assert [s["documents"] for s in manifest["shards"]] == [2, 2, 1]
    assert manifest["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert manifest["format"] == sources.TOKENS_FORMAT
    # Training reads the shards back as a source.
    pattern = str(tmp_path / "out" / "web" / "*.array_record")
    shards = sources.documents(SourceConfig(kind="array_record", paths=[pattern]))
    assert [shards[i].tolist() for i in range(len(shards))] == tokenizer.encode_batch(KEPT)


def test_boilerplate_lines_removed_everywhere(tmp_path, tokenizer_path):
    footer = "Subscribe to our newsletter for more!"
    pair = "This line appears in two documents only."
    bodies = [text(60, seed=10 + i) for i in range(4)]
    files = {f"{i}.txt": (body + footer + "\n" + (pair + "\n" if i < 2 else "") + "ok\n").encode()
             for i, body in enumerate(bodies)}  # fmt: skip
    cfg = make_config(
        tmp_path, tokenizer_path, write_corpus(tmp_path / "c", files),
        cleaning={"boilerplate_min_documents": 3},
    )  # fmt: skip
    manifest = prepare.prepare(cfg)["web"]
    assert manifest["counts"]["boilerplate_lines_removed"] == 4
    expected = [body + (pair + "\n" if i < 2 else "") + "ok\n" for i, body in enumerate(bodies)]
    tokenizer = HuggingFaceTokenizer(tokenizer_path)
    assert read_tokens(tmp_path / "out" / "web") == tokenizer.encode_batch(expected)


def test_quality_filters_counted_under_their_names(tmp_path, tokenizer_path):
    good = text(120, seed=20, per_line=10)
    files = {
        "1.txt": good,
        "2.txt": text(20, seed=21),  # word_count
        "3.txt": "\n".join("• " + line for line in text(120, seed=22).splitlines()),
        "4.txt": "\n".join([" ".join(words(10, seed=23))] * 6 + text(60, seed=24).splitlines()),
    }
    cfg = make_config(
        tmp_path, tokenizer_path,
        write_corpus(tmp_path / "c", {k: v.encode() for k, v in files.items()}),
        cleaning={"max_chars": 10_000},
        quality={"enabled": True, "min_stop_words": 0},  # made-up words: no English stop words
    )  # fmt: skip
    counts = prepare.prepare(cfg)["web"]["counts"]
    dropped = {k: v for k, v in counts["dropped"].items() if v}
    assert dropped == {"word_count": 1, "bullet_lines": 1, "duplicate_lines": 1}
    assert counts["documents_out"] == 1
    assert_counts_add_up(counts)


def test_unreadable_file_is_counted_and_named(tmp_path, tokenizer_path):
    cfg = make_config(tmp_path, tokenizer_path, write_corpus(tmp_path / "corpus"))
    source = cfg.data.sources["web"]
    docs = sources.documents(source)
    gone = tmp_path / "corpus" / "04_other.txt"
    gone.unlink()  # listed, then unreadable: what a vanished or broken file looks like
    tokenizer = HuggingFaceTokenizer(tokenizer_path)
    manifest = prepare.prepare_source("web", source, docs, tokenizer, cfg.prepare)
    assert manifest["unreadable_files"] == [str(gone)]
    assert manifest["counts"]["unreadable"] == manifest["counts"]["dropped"]["unreadable"] == 1
    assert manifest["counts"]["documents_out"] == 4
    assert_counts_add_up(manifest["counts"])


def test_rerun_is_a_no_op(tmp_path, tokenizer_path, capsys):
    pattern = write_corpus(tmp_path / "corpus")
    cfg_path = tmp_path / "prepare.yaml"
    cfg = make_config(tmp_path, tokenizer_path, pattern)
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert prepare.main([f"--config={cfg_path}"]) == 0
    out = tmp_path / "out" / "web"
    before = {p.name: p.stat() for p in out.iterdir()}
    capsys.readouterr()
    assert prepare.main([f"--config={cfg_path}", "prepare.num_workers=2"]) == 0
    captured = capsys.readouterr()
    assert "up to date" in captured.err
    assert "documents_out" in captured.out
    after = {p.name: p.stat() for p in out.iterdir()}
    assert {k: (s.st_ino, s.st_mtime_ns) for k, s in after.items()} == {
        k: (s.st_ino, s.st_mtime_ns) for k, s in before.items()
    }
    # A changed input or setting is not up to date: stale shards go.
    assert prepare.main([f"--config={cfg_path}", "prepare.documents_per_shard=10"]) == 0
    assert sorted(shard_files(out)) == ["shard-00000.array_record"]
    (tmp_path / "corpus" / "04_other.txt").write_text(text(150, seed=99))
    manifest = prepare.prepare(cfg)["web"]
    assert manifest["counts"]["documents_out"] == 5
    assert read_tokens(out)[1] == HuggingFaceTokenizer(tokenizer_path).encode(text(150, seed=99))


def test_resume_after_interruption_matches_an_uninterrupted_run(
    tmp_path, tokenizer_path, monkeypatch
):
    pattern = write_corpus(tmp_path / "corpus")
    reference = make_config(tmp_path / "ref", tokenizer_path, pattern)
    prepare.prepare(reference)
    cfg = make_config(tmp_path, tokenizer_path, pattern)
    out = tmp_path / "out" / "web"
    real_write = prepare._write_shard
    written = []

    def interrupt_after_two(path, records):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path.name)
        return real_write(path, records)

    monkeypatch.setattr(prepare, "_write_shard", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(cfg)
    assert not (out / "manifest.json").exists()
    assert sorted(shard_files(out)) == written
    stats = {name: (out / name).stat() for name in written}

    def counting_write(path, records):
        written.append(path.name)
        return real_write(path, records)

    def no_scan(*args):
        raise AssertionError("the cached plan should be reused")

    monkeypatch.setattr(prepare, "_write_shard", counting_write)
    monkeypatch.setattr(prepare, "_scan_all", no_scan)
    prepare.prepare(cfg)
    assert written == [
        "shard-00000.array_record",
        "shard-00001.array_record",
        "shard-00002.array_record",
    ]
    for name, stat in stats.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == (
            stat.st_ino,
            stat.st_mtime_ns,
        )
    ref_out = tmp_path / "ref" / "out" / "web"
    assert shard_files(out) == shard_files(ref_out)
    assert without_created(out) == without_created(ref_out)
    # A lost manifest and shard: only that shard is written again.
    (out / "manifest.json").unlink()
    (out / "shard-00001.array_record").unlink()
    written.clear()
    prepare.prepare(cfg)
    assert written == ["shard-00001.array_record"]
    assert shard_files(out) == shard_files(ref_out)
    assert without_created(out) == without_created(ref_out)


def test_two_workers_write_the_same_bytes_as_one(tmp_path, tokenizer_path):
    pattern = write_corpus(tmp_path / "corpus")
    options = {"cleaning": {"min_chars": 5, "max_chars": 2000, "boilerplate_min_documents": 2}}
    prepare.prepare(make_config(tmp_path / "one", tokenizer_path, pattern, **options))
    prepare.prepare(
        make_config(tmp_path / "two", tokenizer_path, pattern, num_workers=2, **options)
    )
    one, two = tmp_path / "one" / "out" / "web", tmp_path / "two" / "out" / "web"
    assert shard_files(one) == shard_files(two)
    assert without_created(one) == without_created(two)


def test_bad_key_exits_2_naming_it(capsys):
    assert prepare.main(["prepare.num_wrokers=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prepare.num_wrokers: unknown key")
    assert "prepare.num_workers" in err


def test_near_duplicate_detection():
    base = text(200, seed=30)
    changed = base.replace(base.split()[50], "qqqqq", 1)
    hasher, dedup = MinHasher(DedupConfig()), Deduplicator(DedupConfig())
    assert dedup.check(exact_key(base), hasher(base)) is None
    assert dedup.check(exact_key(changed), hasher(changed)) == "near_duplicate"
    for seed in range(31, 41):
        other = text(200, seed=seed)
        assert dedup.check(exact_key(other), hasher(other)) is None
    assert dedup.check(exact_key(" " + base.replace("\n", " ")), hasher(base)) == "exact_duplicate"


def test_minhash_is_reproducible_and_dedup_switches_off():
    sample = text(100, seed=50)
    assert np.array_equal(MinHasher(DedupConfig())(sample), MinHasher(DedupConfig())(sample))
    off = Deduplicator(DedupConfig(exact=False, near=False))
    assert off.check(exact_key(sample), None) is None
    assert off.check(exact_key(sample), None) is None


def test_sentencepiece_tokenizer_is_shipped_to_workers(tmp_path):
    pattern = write_corpus(tmp_path / "corpus")
    corpus = sources.documents(SourceConfig(kind="text_files", paths=[pattern]))
    model = tokenizer_lib.train_unigram(corpus, vocab_size=300)
    (tmp_path / "sp.model").write_bytes(model)
    cfg = make_config(tmp_path, tmp_path / "sp.model", pattern, tokenizer_kind="sentencepiece")
    manifest = prepare.prepare(cfg)["web"]
    assert manifest["tokenizer_file"] == "tokenizer.model"
    tokenizer = SentencePieceTokenizer.from_bytes(model)
    assert read_tokens(tmp_path / "out" / "web") == tokenizer.encode_batch(KEPT)


def test_counts_that_do_not_add_up_are_refused():
    counts = {"documents_in": 3, "split_extra": 1, "documents_out": 2, "dropped": {"empty": 1}}
    with pytest.raises(AssertionError, match="do not add up"):
        prepare._check_counts(counts)

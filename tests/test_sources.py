"""Columnar and pre-tokenized sources: Parquet, Hugging Face datasets on disk, ArrayRecord token
shards with their manifest; concatenation; pickling for grain workers."""

import concurrent.futures
import json
import pickle

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from maxlm.config import ConfigError, SourceConfig
from maxlm.data.sources import MANIFEST, TOKENS_FORMAT, concat, documents, split

KEY = "data.sources.web"


def texts(docs):
    return [docs[i] for i in range(len(docs))]


def write_parquet(path, rows, column="text", row_group_size=2):
    pq.write_table(pa.table({column: rows, "n": list(range(len(rows)))}), path,
                   row_group_size=row_group_size)  # fmt: skip


def test_parquet_rows_across_files_and_row_groups(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["alpha", "béta", "gamma"])
    write_parquet(tmp_path / "b.parquet", ["delta"])
    docs = documents(SourceConfig(kind="parquet", paths=[str(tmp_path / "*.parquet")]), KEY)
    assert texts(docs) == ["alpha", "béta", "gamma", "delta"]
    assert docs.ids == [f"{tmp_path / 'a.parquet'}:{r}" for r in range(3)] + [
        f"{tmp_path / 'b.parquet'}:0"
    ]
    assert docs.nbytes.tolist() == [5, 5, 5, 5]  # UTF-8 bytes: é is two
    picked = docs.subset([3, 1])
    assert texts(picked) == ["delta", "béta"] and picked.ids == [docs.ids[3], docs.ids[1]]
    assert texts(pickle.loads(pickle.dumps(picked))) == ["delta", "béta"]


@pytest.mark.parametrize(
    ("rows", "column", "problem"),
    [
        (["a", None, "c"], "text", r"a\.parquet row 1: 'text' is null"),
        ([1, 2], "text", r"column 'text' of .*a\.parquet is int64, not a string"),
        (["a"], "body", r"has no column 'text' \(columns: body, n\)"),
    ],
)
def test_bad_parquet_is_an_error_naming_file_and_row(tmp_path, rows, column, problem):
    write_parquet(tmp_path / "a.parquet", rows, column=column)
    with pytest.raises(ConfigError, match=rf"{KEY}\.text_field: .*{problem}"):
        documents(SourceConfig(kind="parquet", paths=[str(tmp_path / "a.parquet")]), KEY)


def test_not_a_parquet_file_is_named(tmp_path):
    (tmp_path / "a.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match=rf"{KEY}\.paths: .*a\.parquet: not a readable Parquet"):
        documents(SourceConfig(kind="parquet", paths=[str(tmp_path / "a.parquet")]), KEY)


def test_hf_dataset_and_dataset_dict_saved_to_disk(tmp_path):
    rows = {"content": ["one", "two", "three"], "lang": ["en", "en", "fr"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "plain"))
    docs = documents(
        SourceConfig(kind="hf_dataset", paths=[str(tmp_path / "plain")], text_field="content"),
        KEY,
    )
    assert texts(docs) == ["one", "two", "three"]
    assert docs.ids[2] == f"{tmp_path / 'plain'}/dataset:2"
    assert texts(pickle.loads(pickle.dumps(docs.subset([2])))) == ["three"]

    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["t0", "t1"]}),
        validation=datasets.Dataset.from_dict({"text": ["v0"]}),
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    cfg = SourceConfig(kind="hf_dataset", paths=[str(tmp_path / "dict")], split="validation")
    assert texts(documents(cfg, KEY)) == ["v0"]
    with pytest.raises(ConfigError, match=rf"{KEY}\.split: .* no split 'test' \(splits: train, "):
        documents(cfg.model_copy(update={"split": "test"}), KEY)
    with pytest.raises(ConfigError, match=rf"{KEY}\.text_field: .* no column 'body'"):
        documents(cfg.model_copy(update={"text_field": "body"}), KEY)
    with pytest.raises(ConfigError, match=rf"{KEY}\.paths: .*nowhere: not a saved dataset"):
        documents(cfg.model_copy(update={"paths": [str(tmp_path / "nowhere")]}), KEY)


def write_shards(directory, shards, fingerprint="f" * 64):
    """ArrayRecord shards as `prepare` writes them: uint32 ids per record, plus manifest.json."""
    directory.mkdir(parents=True, exist_ok=True)
    listed = []
    for k, records in enumerate(shards):
        name = f"shard-{k:05d}.array_record"
        writer = ArrayRecordWriter(str(directory / name), "group_size:1")
        for ids in records:
            writer.write(np.asarray(ids, dtype="<u4").tobytes())
        writer.close()
        listed.append({"file": name, "documents": len(records), "tokens": sum(map(len, records))})
    manifest = {"format": TOKENS_FORMAT, "tokenizer_fingerprint": fingerprint, "shards": listed}
    (directory / MANIFEST).write_text(json.dumps(manifest))


def test_array_record_token_shards(tmp_path):
    write_shards(tmp_path / "web", [[[5, 6, 7], [8]], [[9, 10]]])
    cfg = SourceConfig(kind="array_record", paths=[str(tmp_path / "web" / "*.array_record")])
    docs = documents(cfg, KEY)
    assert [d.tolist() for d in texts(docs)] == [[5, 6, 7], [8], [9, 10]]
    assert all(d.dtype == np.int32 for d in texts(docs))
    assert docs.tokenizer_fingerprint == "f" * 64 and docs.nbytes is None
    assert docs.ids[2] == f"{tmp_path / 'web' / 'shard-00001.array_record'}:0"
    train, held = split(docs, 0.3)
    assert sorted(train.ids + held.ids) == sorted(docs.ids)
    restored = pickle.loads(pickle.dumps(docs.subset([2, 0])))
    assert [d.tolist() for d in texts(restored)] == [[9, 10], [5, 6, 7]]


def test_array_record_shards_of_two_tokenizers_are_an_error(tmp_path):
    write_shards(tmp_path / "a", [[[1]]], fingerprint="a" * 64)
    write_shards(tmp_path / "b", [[[1]]], fingerprint="b" * 64)
    cfg = SourceConfig(kind="array_record", paths=[str(tmp_path / "*" / "*.array_record")])
    with pytest.raises(ConfigError, match=rf"{KEY}\.paths: .*different tokenizers"):
        documents(cfg, KEY)


def test_array_record_without_a_manifest_is_an_error(tmp_path):
    write_shards(tmp_path / "a", [[[1]]])
    (tmp_path / "a" / MANIFEST).unlink()
    cfg = SourceConfig(kind="array_record", paths=[str(tmp_path / "a" / "*.array_record")])
    with pytest.raises(ConfigError, match=rf"{KEY}\.paths: cannot read .*manifest\.json"):
        documents(cfg, KEY)


def test_concat_reads_parts_in_order(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["p0", "p1"])
    (tmp_path / "t.txt").write_text("t0")
    parts = [
        documents(SourceConfig(kind="parquet", paths=[str(tmp_path / "a.parquet")]), KEY),
        documents(SourceConfig(kind="text_files", paths=[str(tmp_path / "t.txt")]), KEY),
    ]
    both = concat(parts)
    assert texts(both) == ["p0", "p1", "t0"]
    assert both.ids == [*parts[0].ids, *parts[1].ids]
    assert both.nbytes.tolist() == [2, 2, 2]
    assert texts(both.subset([2, 0])) == ["t0", "p0"]


def test_documents_read_in_any_order_from_more_files_than_are_kept_open(tmp_path):
    """Each reading thread keeps its last few files open (a bucket costs a round trip per open):
    documents of 7 files read in a shuffled order, over several threads and from a pickled copy
    (as grain's worker processes get it), are each the right line."""
    lines = {f"f{i}.txt": [f"file {i} line {j} " + "x" * i * j for j in range(5)] for i in range(7)}
    for name, text in lines.items():
        (tmp_path / name).write_text("\n".join(text) + "\n")
    cfg = SourceConfig(kind="text_files", paths=[str(tmp_path / "*.txt")], document_per="line")
    docs = documents(cfg, KEY)
    expected = [line for name in sorted(lines) for line in lines[name]]
    order = np.random.default_rng(0).permutation(len(expected)).tolist() * 2
    assert [docs[i].rstrip("\n") for i in order] == [expected[i] for i in order]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        read = list(pool.map(lambda i: docs[i].rstrip("\n"), order))
    assert read == [expected[i] for i in order]
    copy = pickle.loads(pickle.dumps(docs))
    assert [copy[i].rstrip("\n") for i in order] == [expected[i] for i in order]

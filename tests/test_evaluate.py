"""Held-out evaluation: exact bytes per token, `python -m maxlm.eval` reproducing a run's own
final eval (loss, bits per byte, tokens), per-source rows of a mixture, and bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, decoders, models, normalizers
from training import overrides

from maxlm import config
from maxlm.config import SourceConfig, TokenizerConfig
from maxlm.data import mixture, pipeline, tokenizer as tokenizer_lib
from maxlm.data.sources import documents
from maxlm.evaluate import HELD_OUT_SAMPLE_SEED, bucket_length, main, token_bytes
from maxlm.train import train

TEXTS = [
    "def add(x, y):\n    return x + y  # sum\n",
    "naïve café — 日本語のテキスト 🙂 ∑x² Ω⚡",  # characters the tokenizers never saw
    "  leading and trailing spaces \t\n\n",
    "literal <s> and </s> are text",
    "\n\nx",
    "",
]

# --------------------------------------------------------------------------- bytes per token


@pytest.fixture(scope="module")
def text_docs(tmp_path_factory):
    """Word salad with a little non-ASCII: enough distinct pieces for small vocabularies."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(2, 8)))
             for _ in range(300)]  # fmt: skip
    root = tmp_path_factory.mktemp("text")
    for i in range(12):
        lines = [" ".join(rng.choice(words, size=12)) for _ in range(40)]
        (root / f"doc{i}.txt").write_text("\n".join(lines) + "\n# naïve café 日本語\n")
    return documents(SourceConfig(kind="text_files", paths=[str(root / "*.txt")]))


def test_byte_level_bpe_tokens_add_up_to_the_utf8_bytes(text_docs, tmp_path):
    tok = tokenizer_lib.load_tokenizer(
        TokenizerConfig(kind="train_bpe", vocab_size=400, cache_dir=str(tmp_path)),
        text_docs,
        ["<sentinel_0>"],
    )
    table = token_bytes(tok, size=512)
    assert table.shape == (512,) and not table[tok.vocab_size :].any()
    for special in (tok.pad_id, tok.bos_id, tok.eos_id, tok.token_id("<sentinel_0>")):
        assert table[special] == 0
    for text in [*TEXTS, text_docs[0]]:
        assert table[tok.encode(text)].sum() == len(text.encode()), repr(text)


def test_sentencepiece_tokens_add_up_to_the_bytes_plus_the_dummy_prefix(text_docs):
    """Sentencepiece puts '▁' before each text (add_dummy_prefix); it counts as the space byte
    it stands for, one more than the text holds. Byte-fallback pieces count one byte each. So
    does a LLaMA-style tokenizer.json made of the same pieces (Prepend '▁', byte fallback)."""
    sp = tokenizer_lib.SentencePieceTokenizer.from_bytes(
        tokenizer_lib.train_unigram(text_docs, 400)
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.data)
    assert proto.normalizer_spec.add_dummy_prefix
    converted = tokenizers.Tokenizer(
        models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=3, byte_fallback=True)
    )
    converted.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    converted.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    converted.add_special_tokens(
        [AddedToken(p, special=True) for p in ("<pad>", "<s>", "</s>", "<unk>")]
    )
    hf = tokenizer_lib.HuggingFaceTokenizer.from_bytes(converted.to_str().encode())
    # a Unigram tokenizer.json matches the control pieces' text like any piece (sentencepiece
    # does not): there a literal "<s>" becomes id 1, which counts 0 bytes
    for tok, texts in ((sp, TEXTS), (hf, [t for t in TEXTS if "<s>" not in t])):
        table = token_bytes(tok)
        assert table[[tok.pad_id, tok.bos_id, tok.eos_id, 3]].tolist() == [0, 0, 0, 0]
        assert table[tok.token_id("<0x0A>")] == 1
        for text in [*texts, text_docs[0]]:
            dummy_prefix = 1 if text else 0
            assert table[tok.encode(text)].sum() == len(text.encode()) + dummy_prefix, repr(text)


def test_bucket_lengths_are_few():
    assert [bucket_length(n, 100) for n in (1, 16, 17, 33, 64, 65, 100)] == [
        16, 16, 32, 64, 64, 100, 100,
    ]  # fmt: skip


# --------------------------------------------------------------------------- from a checkpoint


def tiny_run(corpus, run_dir, *extra):
    cfg = config.load(
        None,
        overrides(corpus, run_dir, "train.steps=2", "checkpoint.every_steps=2",
                  "eval.every_steps=0", "metrics.tensorboard=false", *extra),
    )  # fmt: skip
    return cfg, train(cfg)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg, summary = tiny_run(corpus, run_dir)
    return cfg, run_dir, summary


def recount(cfg, num_batches):
    """Scored target tokens and their bytes per source, counted on the host from the held-out
    batches training samples."""
    data = mixture.load(cfg)
    table = token_bytes(data.tokenizer, cfg.model.vocab_size)
    layout = pipeline.Layout(
        data.tokenizer, cfg.train.seq_len, cfg.data.add_bos, cfg.data.add_eos,
        cfg.data.shuffle_window, cfg.data.packing, cfg.data.needs_prefix,
    )  # fmt: skip
    counts = {}
    for source in data.held_out:
        tokens = nbytes = 0
        for batch in pipeline.eval_batches(
            source, layout, batch_size=cfg.train.global_batch_size, num_batches=num_batches,
            seed=HELD_OUT_SAMPLE_SEED,
        ):  # fmt: skip
            scored = (batch["segment_ids"] != 0) & (batch.get("loss_mask", 1) != 0)
            tokens += int(scored.sum())
            nbytes += int(table[batch["targets"]][scored].sum())
        counts[source.name] = (tokens, nbytes)
    return counts


def test_cli_reproduces_the_runs_final_eval(run, tmp_path, capsys):
    cfg, run_dir, summary = run
    assert main([f"--checkpoint={run_dir}", f"--output={tmp_path / 'eval.json'}"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())
    overall = report["overall"]
    assert report["step"] == 2 and report["batches"] == cfg.eval.batches
    assert overall["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5, abs=1e-5)
    assert overall["bits_per_byte"] == pytest.approx(summary["eval_bpb"], rel=1e-5)
    assert overall["tokens"] == summary["eval_tokens"]
    assert overall["perplexity"] == pytest.approx(math.exp(overall["loss"]))
    nats = overall["loss"] * overall["tokens"]
    assert overall["bits_per_byte"] == pytest.approx(nats / math.log(2) / overall["bytes"])
    counts = recount(cfg, cfg.eval.batches)
    assert (overall["tokens"], overall["bytes"]) == counts["corpus"]
    assert report["sources"] == {"corpus": overall}
    header, row = out.splitlines()[-2:]
    assert header.split() == ["source", "tokens", "bytes", "loss", "perplexity", "bits/byte"]
    assert row.split()[0] == "corpus" and float(row.split()[3]) == round(overall["loss"], 4)


def test_all_batches_score_every_held_out_document_once(run, tmp_path):
    """--batches=all: every held-out document's tokens and EOS are targets exactly once (BOS is
    never one), and their bytes are the documents' UTF-8 bytes."""
    cfg, run_dir, _ = run
    assert main([f"--checkpoint={run_dir}/checkpoints/2", "--batches=all",
                 f"--output={tmp_path / 'all.json'}"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "all.json").read_text())
    data = mixture.load(cfg)
    docs = [data.held_out[0].docs[i] for i in range(len(data.held_out[0].docs))]
    assert report["batches"] == "all"
    assert report["overall"]["tokens"] == sum(len(ids) + 1 for ids in
                                              data.tokenizer.encode_batch(docs))  # fmt: skip
    assert report["overall"]["bytes"] == sum(len(doc.encode()) for doc in docs)


@pytest.mark.slow
def test_mixture_is_scored_per_source_as_training_reports_it(corpus, tmp_path, capsys):
    """Two sources, the second a prefix-LM objective (its prefixes are read, not scored): the
    CLI's rows match training's eval_loss/<name> and eval_bpb/<name>, and bytes count only the
    scored targets."""
    lines = Path(corpus["glob"]).parent.joinpath("part0.txt").read_text().splitlines()
    (tmp_path / "prose.txt").write_text("\n".join(" ".join(reversed(l.split())) for l in lines))
    cfg, summary = tiny_run(
        corpus, tmp_path / "run",
        "data.sources.prose.kind=text_files", f"data.sources.prose.paths=[{tmp_path}/prose.txt]",
        "data.sources.prose.document_per=line", "data.sources.prose.objective.kind=prefix_lm",
    )  # fmt: skip
    assert main([f"--checkpoint={tmp_path / 'run'}", f"--output={tmp_path / 'eval.json'}"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    counts = recount(cfg, cfg.eval.batches)
    for name, row in report["sources"].items():
        assert row["loss"] == pytest.approx(summary[f"eval_loss/{name}"], rel=1e-5)
        assert row["bits_per_byte"] == pytest.approx(summary[f"eval_bpb/{name}"], rel=1e-5)
        assert (row["tokens"], row["bytes"]) == counts[name]
    assert list(report["sources"]) == ["corpus", "prose"]
    both = report["overall"]
    assert both["tokens"] == sum(r["tokens"] for r in report["sources"].values())
    assert both["bits_per_byte"] == pytest.approx(summary["eval_bpb"], rel=1e-5)
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[-3:]]
    assert rows == ["corpus", "prose", "all"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint={run}/nowhere"], "is neither a run directory"),
        (["--checkpoint={run}", "--batches=0"], "--batches: a positive number or 'all'"),
        (["--checkpoint={run}", "--batches=many"], "--batches: a positive number or 'all'"),
        (["--checkpoint={run}", "--step=3"], "unrecognized arguments: --step=3"),
        (["--checkpoint={run}", "eval.batchez=3"], "eval.batchez"),
        ([], "the following arguments are required: --checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(run, argv, message, capsys):
    _, run_dir, _ = run
    assert main([arg.format(run=run_dir) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_module_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "maxlm.eval", f"--checkpoint={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: checkpoint: ")

"""The lm-evaluation-harness adapter on a tiny run, offline: local multiple-choice,
loglikelihood_rolling and generate_until tasks through `lm_eval.simple_evaluate`, each response
checked against the same strings scored by hand with the model's forward pass."""

import itertools
import json
import math
import sys

import jax
import jax.numpy as jnp
import lm_eval
import lm_eval.tasks
import numpy as np
import pytest
import yaml
from flax import nnx
from lm_eval.api.instance import Instance
from training import NAMES, overrides

from maxlm import config, harness, state as state_lib
from maxlm.checkpoint import open_model
from maxlm.train import train

# every other context ends in a space, which moves to the continuation (as in HFLM)
MC = [
    {
        "context": f"def {a}_reads(x):" + " " * (i % 2),
        "choices": [f" return {b}(x)", " pass", f" return {a}(x) + {i}"],
        "label": i % 3,
    }
    for i, (a, b) in enumerate(zip(NAMES, reversed(NAMES), strict=True))
]
DOCUMENTS = [f"def {a}_sorts(x): return {b}(x) + 3 # the {a} sorts the {b}"
             for a, b in itertools.pairwise(NAMES)]  # fmt: skip
PROMPTS = [f"def {a}_counts(x): return" for a in NAMES[:3]]
UNTIL = ")"


def write_task(root, name, rows, **spec):
    """A local lm_eval task: `rows` as a jsonl file, read with the `json` dataset builder."""
    (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = {"dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(root / f"{name}.jsonl")}}}  # fmt: skip
    (root / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **data, **spec}))


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = config.load(
        None,
        overrides(corpus, run_dir, "train.steps=2", "checkpoint.every_steps=2",
                  "eval.every_steps=0", "metrics.tensorboard=false"),
    )  # fmt: skip
    train(cfg)
    return run_dir


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    write_task(
        root, "tiny_mc", MC, output_type="multiple_choice", doc_to_text="{{context}}",
        doc_to_target="label", doc_to_choice="choices", target_delimiter="",
        metric_list=[{"metric": "acc"}],
    )  # fmt: skip
    write_task(
        root, "tiny_ppl", [{"text": d} for d in DOCUMENTS], output_type="loglikelihood_rolling",
        doc_to_text="", doc_to_target="{{text}}", metric_list=[{"metric": "bits_per_byte"}],
    )  # fmt: skip
    write_task(
        root, "tiny_gen", [{"prompt": p, "answer": " x"} for p in PROMPTS],
        output_type="generate_until", doc_to_text="{{prompt}}", doc_to_target="{{answer}}",
        generation_kwargs={"until": [UNTIL], "max_gen_toks": 8, "do_sample": False},
        metric_list=[{"metric": "exact_match"}],
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def evaluated(run, tasks):
    return lm_eval.simple_evaluate(
        model="maxlm",
        model_args=f"checkpoint={run},batch_size=4",
        tasks=["tiny_mc", "tiny_ppl", "tiny_gen"],
        task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
    )


class ByHand:
    """The checkpoint's model called directly: one unpadded row per sequence."""

    def __init__(self, run_dir):
        saved = open_model(run_dir)
        self.tok = saved.tokenizer()
        model = state_lib.model_from_params(saved.config.model, saved.params())
        graphdef, self.state = nnx.split(model)

        @jax.jit  # compiles once per length: quicker than running op by op
        def forward(state, tokens):
            positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
            return nnx.merge(graphdef, state)(tokens, jnp.ones_like(tokens), positions)[0]

        self.forward = forward

    def logits(self, ids):
        return self.forward(self.state, jnp.asarray([ids], jnp.int32))

    def scores(self, ids):
        """log p(ids[i] | ids[:i]) and whether it is the argmax, for i >= 1."""
        logits = self.logits(ids[:-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        targets = np.asarray(ids[1:])
        return np.asarray(logp)[np.arange(len(targets)), targets], (
            np.asarray(jnp.argmax(logits, axis=-1)) == targets
        )

    def continuation(self, context, continuation):
        """(log p, greedy) of a continuation: BOS + context and BOS + the whole text encoded,
        the context's trailing spaces moved to the continuation."""
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        bos = [self.tok.bos_id]
        whole = bos + self.tok.encode(stripped + continuation)
        n = len(whole) - len(bos + self.tok.encode(stripped))
        logp, greedy = self.scores(whole)
        return float(logp[-n:].sum()), bool(greedy[-n:].all())

    def greedy(self, prompt, max_new):
        ids = [self.tok.bos_id, *self.tok.encode(prompt)]
        new = []
        for _ in range(max_new):
            token = int(jnp.argmax(self.logits(ids + new)[-1]))
            if token == self.tok.eos_id:
                break
            new.append(token)
        return self.tok.decode(new)


@pytest.fixture(scope="module")
def by_hand(run):
    return ByHand(run)


def responses(evaluated, task):
    return [(s["arguments"], s["resps"]) for s in sorted(evaluated["samples"][task],
                                                         key=lambda s: s["doc_id"])]  # fmt: skip


def test_multiple_choice_scores_and_accuracy_match_the_forward_pass(evaluated, by_hand):
    correct = []
    for (arguments, resps), doc in zip(responses(evaluated, "tiny_mc"), MC, strict=True):
        expected = [by_hand.continuation(context, cont) for context, cont in arguments]
        got = [resp[0] for resp in resps]
        assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], rel=1e-5, abs=1e-4)
        assert [g[1] for g in got] == [e[1] for e in expected]
        correct.append(int(np.argmax([e[0] for e in expected])) == doc["label"])
    assert evaluated["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))


def test_rolling_loglikelihood_is_the_whole_document_scored_after_bos(evaluated, by_hand):
    expected = []
    for (arguments, resps), text in zip(responses(evaluated, "tiny_ppl"), DOCUMENTS, strict=True):
        assert arguments[0][0] == text
        logp, _ = by_hand.scores([by_hand.tok.bos_id, *by_hand.tok.encode(text)])
        expected.append(float(logp.sum()))
        assert resps[0][0] == pytest.approx(expected[-1], rel=1e-5)
    nbytes = sum(len(text.encode()) for text in DOCUMENTS)
    bits_per_byte = -sum(expected) / math.log(2) / nbytes
    assert evaluated["results"]["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(bits_per_byte)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(evaluated, by_hand):
    for (arguments, resps), prompt in zip(responses(evaluated, "tiny_gen"), PROMPTS, strict=True):
        assert arguments[0][0] == prompt
        assert resps[0][0] == by_hand.greedy(prompt, 8).split(UNTIL)[0]


def test_long_inputs_are_cut_to_max_length_like_hflm(run, by_hand):
    """max_length 16: a long context is cut from the left; a long document is scored in
    windows of 16 predicted tokens, the first after BOS, the next each after the one token
    before it, and the last, shorter one after the 16 inputs that end it (lm_eval's rolling
    windows)."""
    lm = harness.MaxLM(checkpoint=str(run), max_length="16", batch_size="3", device="cpu")
    assert lm.batch_size == 8  # rounded up to the 8 data-parallel devices
    tok = by_hand.tok
    context, continuation = " ".join(DOCUMENTS[:2]), " return alpha(x)"
    (got,) = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    whole = [tok.bos_id, *tok.encode(context + continuation)]
    n = len(whole) - 1 - len(tok.encode(context))
    logp, greedy = by_hand.scores(whole[-17:])
    assert got[0] == pytest.approx(float(logp[-n:].sum()), rel=1e-5)
    assert got[1] == bool(greedy[-n:].all())

    document = " ".join(DOCUMENTS[:3])
    ids = tok.encode(document)
    assert len(ids) > 40
    expected = by_hand.scores([tok.bos_id, *ids[:16]])[0].sum()
    for start in range(16, len(ids), 16):
        end = min(start + 16, len(ids))
        expected += by_hand.scores(ids[end - 17 : end])[0][start - end :].sum()
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (document,), 0)])
    assert rolled == pytest.approx(float(expected), rel=1e-5)


def test_sampling_follows_the_seed(run):
    kwargs = {"until": ["\n"], "max_gen_toks": 6, "do_sample": True, "temperature": 1.5,
              "top_k": 20, "top_p": 0.95}  # fmt: skip
    requests = [Instance("generate_until", {}, (p, kwargs), i) for i, p in enumerate(PROMPTS)]
    first = harness.MaxLM(checkpoint=str(run), seed=7).generate_until(requests)
    again = harness.MaxLM(checkpoint=str(run), seed=7).generate_until(requests)
    other = harness.MaxLM(checkpoint=str(run), seed=8).generate_until(requests)
    assert first == again and first != other


def test_command_line_registers_the_model(run, tasks, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)  # main hands lm_eval its arguments there
    harness.main(["--model_args", f"checkpoint={run}", "--tasks", "tiny_ppl",
                  "--include_path", str(tasks), "--output_path", str(tmp_path)])  # fmt: skip
    (written,) = tmp_path.rglob("results_*.json")
    results = json.loads(written.read_text())
    assert results["config"]["model"] == "maxlm"
    assert math.isfinite(results["results"]["tiny_ppl"]["bits_per_byte,none"])


def test_unknown_model_args_are_named(run):
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['max_lenght'\]"):
        harness.MaxLM(checkpoint=str(run), max_lenght="16")

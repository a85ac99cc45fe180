"""Generation: KV-cache decoding equals the full forward pass (MHA, GQA, scanned or not, ragged
batches), greedy decoding equals Hugging Face's, sampling semantics, EOS, and the CLI."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from training import overrides

from maxlm import config, generate as generate_lib, mesh as mesh_lib, sharding, state as state_lib
from maxlm.checkpoint import open_model
from maxlm.config import DEFAULT_SHARDING_RULES, MeshConfig, ModelConfig
from maxlm.generate import MAX_LENGTH, Sampling, generate, main, sample
from maxlm.model import Llama
from maxlm.state import model_from_params

V, D, L, N, F = 64, 32, 2, 4, 48


def model_config() -> dict:
    # init_std 0.1 (as in test_model.py): logits far from uniform, so mistakes show
    fields = dict(vocab_size=V, d_model=D, num_layers=L, num_heads=N, num_kv_heads=2, mlp_dim=F)
    return {**fields, "init_std": 0.1, "dtype": "float32"}


def make(seed: int = 0, **overrides) -> Llama:
    return Llama(ModelConfig(**{**model_config(), **overrides}), rngs=nnx.Rngs(seed))


@nnx.jit
def forward(model, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model(tokens, jnp.ones_like(tokens), positions)


@nnx.jit
def decode(model, tokens, positions, cache, token_mask):
    return model.decode(tokens, positions, cache, token_mask)


def random_tokens(shape, seed: int = 0) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 0, V, dtype=jnp.int32))


# --------------------------------------------------------------------------- the KV cache


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_prefill_and_steps_equal_the_full_forward(kv_heads, scan):
    """Prefill 5 tokens, decode 4 one at a time, then a chunk of 3: every position's logits
    equal the training forward pass over all 12 tokens."""
    model = make(num_kv_heads=kv_heads, scan_layers=scan)
    tokens = random_tokens((2, 12))
    positions = np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape)
    cache = model.init_cache(2, 16)
    logits = []
    for start, stop in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 12)]:
        chunk = slice(start, stop)
        out, cache = decode(model, tokens[:, chunk], positions[:, chunk], cache,
                            np.ones((2, stop - start), bool))  # fmt: skip
        logits.append(out)
    assert int(cache.index) == 12 and bool(cache.valid[:, :12].all())
    assert cache.k.shape == (L, 2, 16, kv_heads, D // N) and cache.k.dtype == jnp.float32
    np.testing.assert_allclose(jnp.concatenate(logits, 1), forward(model, tokens), atol=2e-5)


def test_left_padded_rows_equal_each_prompt_alone():
    """Prompts of 3 and 7 tokens, left-padded into one batch, then 4 more tokens each: every
    row's logits equal those of its own sequence run alone, unpadded."""
    model = make()
    lengths, more = [3, 7], random_tokens((2, 4), seed=1)
    prompts = [random_tokens((1, n), seed=2 + n)[0] for n in lengths]
    tokens = np.zeros((2, 7), np.int32)
    positions = np.zeros((2, 7), np.int32)
    mask = np.zeros((2, 7), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, 7 - len(prompt) :] = prompt
        positions[row, 7 - len(prompt) :] = np.arange(len(prompt))
        mask[row, 7 - len(prompt) :] = True
    prefill, cache = decode(model, tokens, positions, model.init_cache(2, 16), mask)
    steps = []
    for i in range(4):
        step_positions = np.array([[n + i] for n in lengths], np.int32)
        out, cache = decode(model, more[:, i : i + 1], step_positions, cache, np.ones((2, 1), bool))
        steps.append(out)
    for row, prompt in enumerate(prompts):
        alone = forward(model, np.concatenate([prompt, more[row]])[None])[0]
        got = jnp.concatenate([prefill[row, 7 - len(prompt) :], *(s[row] for s in steps)])
        np.testing.assert_allclose(got, alone, atol=2e-5)


def test_sharded_model_generates_the_same_with_a_sharded_cache():
    """Parameters and activations sharded on a (data 2, fsdp 2, tensor 2) mesh: the cache is
    split like the training activations and greedy decoding gives the same tokens."""
    model, prompts = make(), [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [3, 3], [9]]
    mesh = mesh_lib.make(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = DEFAULT_SHARDING_RULES
    constrain = sharding.ActivationSharding.create(mesh, rules)
    cfg = ModelConfig(**model_config())
    abstract = nnx.eval_shape(lambda: state_lib.build_model(cfg, 0, constrain))
    names, shapes = state_lib.logical_names(abstract), state_lib.split_params(abstract)[1]
    params = jax.device_put(
        state_lib.split_params(model)[1], sharding.param_shardings(names, shapes, mesh, rules)
    )
    sharded = model_from_params(cfg, params, constrain)
    cache = nnx.jit(lambda m: m.init_cache(4, 64))(sharded)
    assert cache.k.sharding.spec == P(None, ("data", "fsdp"), None, "tensor")
    expected = generate(model, prompts, max_new_tokens=6)
    assert generate(sharded, prompts, max_new_tokens=6) == expected


# --------------------------------------------------------------------------- Hugging Face parity


def test_greedy_equals_hugging_face_generate(tmp_path):
    """A random LlamaForCausalLM (GQA), converted by maxlm.convert: our batched greedy decoding
    of three prompts of different lengths equals transformers' `generate`, one prompt at a
    time, token for token. The large init std keeps argmax clear of near-ties."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from maxlm.convert import load_hf

    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
        initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    hf_model = transformers.LlamaForCausalLM(hf_config).float().eval()
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    model_cfg, params = load_hf(tmp_path)
    model = model_from_params(model_cfg, params)

    prompts = [[5, 17, 3], [90, 1, 44, 44, 8, 61, 23, 7], [12, 34, 56, 78, 9, 10, 11, 2, 3, 4, 5]]
    ours = generate(model, prompts, max_new_tokens=20)
    for prompt, new in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=20,
            )  # fmt: skip
        assert new == out[0, len(prompt) :].tolist()


# --------------------------------------------------------------------------- sampling


def frequencies(logits, sampling: Sampling, draws: int = 4000) -> np.ndarray:
    keys = jax.random.split(jax.random.key(0), draws)
    ids = jax.jit(jax.vmap(lambda key: sample(logits[None], key, sampling)[0]))(keys)
    return np.bincount(np.asarray(ids), minlength=logits.shape[0]) / draws


def test_top_k_only_draws_among_the_k_most_likely():
    logits = jax.random.normal(jax.random.key(3), (32,)) * 2
    freq = frequencies(logits, Sampling(temperature=1.5, top_k=5))
    top5 = set(np.argsort(-np.asarray(logits))[:5].tolist())
    assert set(np.flatnonzero(freq).tolist()) == top5  # each of the 5, nothing else


def test_temperature_and_top_p_give_the_expected_distribution():
    """Probabilities .5 .3 .15 .05: top_p 0.75 keeps the first two, renormalized (.625 .375);
    temperature 2 flattens to p**(1/2) normalized. 4000 draws: standard error < 0.008."""
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    freq = frequencies(logits, Sampling(temperature=1.0, top_p=0.75))
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.04)
    assert freq[2:].sum() == 0
    flat = np.sqrt([0.5, 0.3, 0.15, 0.05])
    freq = frequencies(logits, Sampling(temperature=2.0))
    np.testing.assert_allclose(freq, flat / flat.sum(), atol=0.04)
    freq = frequencies(logits, Sampling(temperature=1.0, top_k=3, top_p=0.85))
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.04)


def test_sampling_is_seeded_and_its_limits_equal_greedy():
    model, prompts = make(), [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    greedy = generate(model, prompts, max_new_tokens=8)
    warm = Sampling(temperature=1.0)
    first = generate(model, prompts, max_new_tokens=8, sampling=warm, seed=7)
    assert generate(model, prompts, max_new_tokens=8, sampling=warm, seed=7) == first
    assert generate(model, prompts, max_new_tokens=8, sampling=warm, seed=8) != first
    assert first != greedy
    for limit in [Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=1e-6)]:
        assert generate(model, prompts, max_new_tokens=8, sampling=limit, seed=7) == greedy


def test_eos_stops_one_row_while_the_other_continues():
    model, prompts = make(), [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    greedy = generate(model, prompts, max_new_tokens=10)
    # an id row 1 emits after its first token that row 0 never emits
    eos = next(t for t in greedy[1][1:] if t not in greedy[0] and t != greedy[1][0])
    streamed: list[list[int | None]] = []
    new = generate(model, prompts, max_new_tokens=10, eos_id=eos, on_tokens=streamed.append)
    assert new == [greedy[0], greedy[1][: greedy[1].index(eos)]]
    assert len(streamed) == 10
    for row in range(2):
        ids = [step[row] for step in streamed]
        assert [i for i in ids if i is not None] == new[row]
        assert ids == new[row] + [None] * (10 - len(new[row]))  # None once finished


def test_invalid_inputs_are_clear_errors():
    model = make()
    cases = [
        ([], {}, "at least one prompt"),
        ([[1], []], {}, r"prompts\[1\] is empty"),
        ([[1, V]], {}, f"token id {V} is outside"),
        ([[1]], {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ([[1]], {"max_new_tokens": MAX_LENGTH}, "exceed the longest supported"),
        ([[1]], {"eos_id": -1}, "eos_id -1 is outside"),
    ]
    for prompts, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(model, prompts, **{"max_new_tokens": 4, **kwargs})
    for kwargs, message in [
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            Sampling(**kwargs)


# --------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory):
    """A tiny run trained for 2 steps, checkpointed with its tokenizer."""
    from maxlm.train import train

    run = tmp_path_factory.mktemp("run")
    extra = ["train.steps=2", "checkpoint.every_steps=2", "eval.every_steps=0"]
    samples = ["eval.sample_prompts=['def alpha_reads(x):']", "eval.sample_tokens=12"]
    train(config.load(None, overrides(corpus, run, *extra, *samples, "metrics.tensorboard=false")))
    return run


def test_cli_streams_the_greedy_completion_of_one_prompt(run_dir, capsys):
    capsys.readouterr()  # the training run's output
    prompt = "def alpha_reads(x):"
    assert main([f"--checkpoint={run_dir}", f"--prompt={prompt}", "--max-new-tokens=12"]) == 0
    out = capsys.readouterr().out
    saved = open_model(run_dir)
    tokenizer = saved.tokenizer()
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    model = model_from_params(saved.config.model, saved.params())
    new = generate(model, [ids], max_new_tokens=12, eos_id=tokenizer.eos_id)[0]
    completion = tokenizer.decode(ids + new)[len(tokenizer.decode(ids)) :]
    assert new and completion
    # the run printed the same greedy continuation at its end (eval.sample_prompts)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["samples"] == [{"prompt": prompt, "continuation": completion}]
    assert out == prompt + completion + "\n"


def test_cli_prompts_file_and_errors(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def beta\n\nthe gamma\n")
    argv = [f"--checkpoint={run_dir}", f"--prompts-file={prompts}", "--max-new-tokens=4",
            "--temperature=0.7", "--top-k=20", "--top-p=0.9", "--seed=3"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "--- 1/2 ---" and out[1].startswith("def beta")
    assert "--- 2/2 ---" in out and out[out.index("--- 2/2 ---") + 1].startswith("the gamma")
    for bad in [
        [f"--checkpoint={tmp_path / 'missing'}", "--prompt=x"],
        [f"--checkpoint={run_dir}", "--prompt=x", "--top-p=2"],
        [f"--checkpoint={run_dir}", "--prompt=x", "--max-new-tokens=0"],
        [f"--checkpoint={run_dir}", "--prompt=x", "--no-such-flag"],
        [f"--checkpoint={run_dir}", "--prompt=x", "model.no_such_key=1"],
        [f"--checkpoint={run_dir}"],
    ]:
        assert main(bad) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
        assert captured.out == ""


def test_stream_writes_multibyte_characters_whole(run_dir):
    """The run's byte-level BPE splits 'é' and '€' into byte tokens: the stream never shows a
    half character, and ends with the whole text."""
    tokenizer = open_model(run_dir).tokenizer()
    prompt_ids = tokenizer.encode("x = ")
    new_ids = tokenizer.encode("café €5")
    assert len(new_ids) > len("café €5")  # some character spans several tokens
    out = io.StringIO()
    stream = generate_lib._Stream(tokenizer, prompt_ids, out)
    shown = []
    for token in new_ids:
        stream([token])
        shown.append(out.getvalue())
    stream([None])
    stream.close()
    assert all("\ufffd" not in text for text in shown)
    assert out.getvalue() == "café €5\n"

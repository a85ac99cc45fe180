"""Hugging Face <-> maxlm conversion: bit-identical round trips, logits parity with transformers
on random-init models (MHA / GQA, RoPE bases and scalings, tied or untied, odd vocabularies,
packed and unpacked), the RoPE layout permutation, and errors that name the tensor or file.

Tolerances are never relaxed to make a change pass: a parity failure is a real bug in the
model, the converter or the config mapping."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import tokenizers
import torch
import training
import transformers

from maxlm import config, convert, train
from maxlm.checkpoint import open_model
from maxlm.state import model_from_params

PARITY_CASES = {
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    "gqa-tied-odd-vocab": dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0, vocab_size=1001
    ),
    "gqa-llama3-scaling-head-dim": dict(
        num_key_value_heads=1,
        head_dim=24,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mha-linear-scaling": dict(
        num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 4.0}
    ),
}


def hf_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A random-init tiny LlamaForCausalLM in float32 (std 0.2: logits far from ties)."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.2,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    ) | overrides  # fmt: skip
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).float().eval()


def write_tokenizer(folder, vocab_size: int = 300) -> None:
    """A byte-level BPE tokenizer.json with <s> / </s> (Hugging Face layout)."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["def alpha(x): return beta(x) + 1"] * 20, trainer)
    bpe.save(str(folder / "tokenizer.json"))


def save_hf(model, folder, *, dtype=torch.float32, shard: str = "40KB", tokenizer: bool = True):
    model.to(dtype).save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
    if tokenizer:
        write_tokenizer(folder)
    return folder


def hf_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safetensors.safe_open(file, "pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return tensors


def maxlm_logits(model, tokens, segment_ids=None, positions=None) -> np.ndarray:
    tokens = jnp.asarray(tokens, jnp.int32)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(model(tokens, jnp.asarray(segment_ids), jnp.asarray(positions)))


def assert_close(ours: np.ndarray, reference: np.ndarray) -> None:
    """Equal within 1e-4 relative to the logits' scale (float32)."""
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_transformers_on_packed_and_unpacked_inputs(case, tmp_path):
    reference = hf_model(**PARITY_CASES[case])
    save_hf(reference, tmp_path / "hf", tokenizer=False)
    model_cfg, params = convert.load_hf(tmp_path / "hf")
    model = model_from_params(model_cfg.model_copy(update={"dtype": "float32"}), params)
    vocab = reference.config.vocab_size
    rng = np.random.default_rng(0)

    tokens = rng.integers(0, vocab, (2, 40))  # past original_max_position: scaling matters
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    assert_close(maxlm_logits(model, tokens), expected)

    # one packed row of two documents == each document alone
    first, second = rng.integers(0, vocab, 13), rng.integers(0, vocab, 19)
    packed = np.concatenate([first, second])[None]
    segments = np.array([[1] * 13 + [2] * 19])
    positions = np.array([list(range(13)) + list(range(19))])
    ours = maxlm_logits(model, packed, segments, positions)[0]
    with torch.no_grad():
        alone = [reference(torch.tensor(d[None])).logits[0].numpy() for d in (first, second)]
    assert_close(ours, np.concatenate(alone))


@pytest.mark.parametrize(
    ("dtype", "tied"), [(torch.bfloat16, True), (torch.float32, False), (torch.float16, False)]
)
def test_round_trip_hf_maxlm_hf_is_bit_identical(dtype, tied, tmp_path):
    source = save_hf(hf_model(tie_word_embeddings=tied), tmp_path / "hf", dtype=dtype)
    assert len(list(source.glob("*.safetensors"))) > 1  # sharded, with an index
    converted = convert.hf_to_maxlm(source, tmp_path / "maxlm")
    back = convert.maxlm_to_hf(converted, tmp_path / "back", max_shard_bytes=30_000)

    original, returned = hf_tensors(source), hf_tensors(back)
    assert sorted(returned) == sorted(original)
    for name, tensor in original.items():
        assert returned[name].dtype == tensor.dtype, name
        assert torch.equal(returned[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert len(list(back.glob("*.safetensors"))) > 1
    reloaded = transformers.AutoConfig.from_pretrained(back).to_dict()
    expected = transformers.AutoConfig.from_pretrained(source).to_dict()
    for key in ("num_key_value_heads", "rope_parameters", "tie_word_embeddings", "vocab_size"):
        assert reloaded[key] == expected[key], key
    loaded = transformers.LlamaForCausalLM.from_pretrained(back)
    assert loaded.dtype == dtype
    ids = transformers.AutoTokenizer.from_pretrained(back)("def alpha")["input_ids"]
    assert ids == open_model(converted).tokenizer().encode("def alpha")


def test_trained_maxlm_model_loads_in_transformers_with_equal_logits(corpus, tmp_path):
    cfg = config.load(
        None,
        training.overrides(
            corpus, tmp_path / "run", "train.steps=2", "checkpoint.every_steps=2",
            "model.num_kv_heads=2", "model.rope_theta=20000.0",
        ),
    )  # fmt: skip
    train.train(cfg)
    out = convert.maxlm_to_hf(tmp_path / "run", tmp_path / "hf")
    reference = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    saved = open_model(tmp_path / "run")
    model = model_from_params(saved.config.model, saved.params())
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "def alpha_reads(x): return beta(x) + 3"
    assert tokenizer(text)["input_ids"] == saved.tokenizer().encode(text)
    tokens = np.array([saved.tokenizer().encode(text)])
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    assert_close(maxlm_logits(model, tokens), expected)


def test_converted_model_initializes_training(corpus, tmp_path):
    source = save_hf(
        hf_model(vocab_size=320, hidden_size=64, num_attention_heads=4), tmp_path / "hf"
    )
    converted = convert.hf_to_maxlm(source, tmp_path / "maxlm")
    saved = open_model(converted)
    run = tmp_path / "run"
    overrides = training.overrides(corpus, run, "train.steps=1", "checkpoint.every_steps=1")
    model_keys = [o for o in overrides if not o.startswith("model.")]
    cfg = config.load(
        str(converted / "config.yaml"),
        [
            *model_keys,
            f"checkpoint.init_from={converted}",
            "optim.lr=1e-12",
            "optim.schedule.warmup_steps=0",
        ],
    )
    # the converted config carries the model and the Hugging Face tokenizer
    assert cfg.model.num_kv_heads == 2 and cfg.data.tokenizer.kind == "huggingface"
    train.train(cfg)
    trained = open_model(run).params()
    embedding = np.asarray(saved.params()["embed_tokens"]["embedding"])
    np.testing.assert_allclose(
        np.asarray(trained["embed_tokens"]["embedding"]), embedding, atol=1e-6
    )


def interleaved_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Meta's original RoPE: dims (2j, 2j+1) form a rotated pair. x: (T, heads, H)."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angles = positions[:, None] * inv_freq
    pairs = x[..., 0::2] + 1j * x[..., 1::2]
    rotated = pairs * np.exp(1j * angles)[:, None, :]
    return np.stack([rotated.real, rotated.imag], axis=-1).reshape(x.shape)


def test_rope_permutation_maps_meta_layout_to_rotate_half():
    from maxlm.model import apply_rope, rope_frequencies, rope_sin_cos

    rng = np.random.default_rng(0)
    heads, head_dim, d_model, length = 2, 8, 6, 5
    meta_weight = rng.normal(size=(heads * head_dim, d_model))
    x = rng.normal(size=(length, d_model))
    positions = np.arange(length, dtype=np.float64)
    meta = interleaved_rope((x @ meta_weight.T).reshape(length, heads, head_dim), positions, 1e4)

    hf_weight = convert.rope_permute(meta_weight, heads)
    projected = jnp.asarray((x @ hf_weight.T).reshape(1, length, heads, head_dim), jnp.float32)
    sin, cos = rope_sin_cos(jnp.asarray(positions[None]), jnp.asarray(rope_frequencies(8, 1e4)))
    ours = np.asarray(apply_rope(projected, sin, cos))[0]
    # same attention scores: q.k is invariant to a shared permutation of the head dims
    perm = convert.rope_permute(np.arange(heads * head_dim)[:, None].astype(float), heads)
    order = perm[:head_dim, 0].astype(int)
    np.testing.assert_allclose(ours[..., np.argsort(order)], meta, atol=1e-5)
    np.testing.assert_array_equal(
        convert.rope_permute(hf_weight, heads, to_half=False), meta_weight
    )


@pytest.mark.parametrize("llama3", [False, True])
def test_meta_checkpoint_with_two_model_parallel_shards_matches_transformers(llama3, tmp_path):
    """Meta's original layout (interleaved RoPE, consolidated.NN.pth split for model
    parallelism) built from a Hugging Face model converts to the same logits."""
    reference = hf_model(num_key_value_heads=2, intermediate_size=192, rope_theta=500000.0)
    hf = {name: tensor.detach().clone() for name, tensor in reference.state_dict().items()}
    heads, kv_heads = 4, 2
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for meta_name, (hf_name, axis) in convert.META_NAMES.items():
        for i in range(2) if "{i}" in meta_name else [None]:
            tensor = hf[hf_name.format(i=i)]
            if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                count = heads if "q_proj" in hf_name else kv_heads
                tensor = torch.tensor(convert.rope_permute(tensor.numpy(), count, to_half=False))
            if axis is None:  # LLaMA 1/2 split the embedding on D, LLaMA 3 on the vocabulary
                axis = 0 if llama3 else 1
            halves = [tensor, tensor] if axis == -1 else torch.chunk(tensor, 2, dim=axis)
            for shard, half in zip(shards, halves, strict=True):
                shard[meta_name.format(i=i)] = half.to(torch.bfloat16).clone()
    folder = tmp_path / "meta"
    folder.mkdir()
    for n, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{n:02d}.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": heads, "n_kv_heads": kv_heads,
              "multiple_of": 64, "norm_eps": 1e-5, "rope_theta": 500000.0,
              "vocab_size": 97 if llama3 else -1}  # fmt: skip
    (folder / "params.json").write_text(json.dumps(params))
    converted = convert.hf_to_maxlm(folder, tmp_path / "maxlm")
    saved = open_model(converted)
    assert saved.config.model.mlp_dim == 192  # Meta's rule: 2/3 * 4 * dim rounded up to 64
    model = model_from_params(saved.config.model, saved.params())
    with torch.no_grad():  # the same bfloat16-rounded weights as the shards (not RoPE buffers)
        for parameter in reference.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    tokens = np.random.default_rng(0).integers(0, 97, (2, 24))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    assert_close(maxlm_logits(model, tokens), expected)


def test_bad_inputs_name_the_tensor_or_file(tmp_path, capsys):
    source = save_hf(hf_model(), tmp_path / "hf")

    mistral = tmp_path / "mistral"
    shutil.copytree(source, mistral)
    settings = json.loads((mistral / "config.json").read_text())
    settings |= {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    (mistral / "config.json").write_text(json.dumps(settings))
    with pytest.raises(convert.ConversionError, match="only LLaMA"):
        convert.hf_to_maxlm(mistral, tmp_path / "out1")

    wrong_heads = tmp_path / "wrong_heads"
    shutil.copytree(source, wrong_heads)
    settings = json.loads((wrong_heads / "config.json").read_text()) | {"num_key_value_heads": 4}
    (wrong_heads / "config.json").write_text(json.dumps(settings))
    with pytest.raises(convert.ConversionError, match=r"model\.layers\.0\.self_attn\.k_proj"):
        convert.hf_to_maxlm(wrong_heads, tmp_path / "out2")

    fewer_layers = tmp_path / "fewer_layers"
    shutil.copytree(source, fewer_layers)
    settings = json.loads((fewer_layers / "config.json").read_text()) | {"num_hidden_layers": 1}
    (fewer_layers / "config.json").write_text(json.dumps(settings))
    with pytest.raises(convert.ConversionError, match=r"tensor model\.layers\.1\."):
        convert.hf_to_maxlm(fewer_layers, tmp_path / "out3")

    missing = tmp_path / "missing"
    shutil.copytree(source, missing)
    shard = sorted(missing.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert convert.main(["hf-to-maxlm", str(missing), str(tmp_path / "out4")]) == 2
    assert f"{shard.name}: shard missing" in capsys.readouterr().err
    assert not (tmp_path / "out4" / "state").exists()

    assert convert.main(["hf-to-maxlm", str(source), str(tmp_path / "ok")]) == 0
    assert convert.main(["hf-to-maxlm", str(source), str(tmp_path / "ok")]) == 2
    assert "already holds a converted model" in capsys.readouterr().err
    # the way back never writes over another model's shards
    before = {f.name: f.read_bytes() for f in source.iterdir()}
    assert convert.main(["maxlm-to-hf", str(tmp_path / "ok"), str(source)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {source}: already holds safetensors")
    assert {f.name: f.read_bytes() for f in source.iterdir()} == before
    assert convert.main(["hf-to-maxlm", str(source), str(tmp_path / "x"), "--dtype=int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --dtype: invalid choice") and err.count("\n") == 1

"""maxlm.mkl: MKL's sgemm as an XLA:CPU custom call, and when maxlm chooses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import attention, config, matmul, mesh as mesh_lib, mkl, state as state_lib, train_step
from maxlm.data.synthetic import packed_batch

TARGETS = {"float32": "maxlm_mkl_gemm", "bfloat16": "maxlm_mkl_gemm_bf16"}

needs_mkl = pytest.mark.skipif(
    mkl.library_path() is None and not mkl.installable(),
    reason="Intel MKL has no wheel for this machine (x86-64 only)",
)


needs_openblas = pytest.mark.skipif(
    not mkl.installable(), reason="scipy-openblas32 comes with MKL's wheel here (x86-64 only)"
)


@pytest.fixture
def float32_gemm_kept(monkeypatch):
    """Whatever sgemm a test switches to, the next test starts on the one in use before."""
    in_use = mkl.float32_gemm() if mkl.unavailable_reason() is None else None
    yield
    monkeypatch.undo()  # the test's patches (a vendor, a missing OpenBLAS) first
    if in_use is not None:
        mkl.use_float32_gemm(in_use)


@needs_mkl
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("m, k, n", [(197, 33, 70), (70, 33, 197), (8, 5, 3)])
@pytest.mark.parametrize(
    "dtype, sgemm",
    [(jnp.float32, "mkl"), pytest.param(jnp.float32, "openblas", marks=needs_openblas),
     (jnp.bfloat16, "mkl")],
)  # fmt: skip
def test_gemm_equals_numpy(m, k, n, transpose_a, transpose_b, dtype, sgemm, float32_gemm_kept):
    """Every transpose combination; row blocks (m >= n), column blocks (n > m), and a product
    too small to split; sizes that are not multiples of the 16-row blocks; float32 by MKL's and
    by OpenBLAS's sgemm. bfloat16 operands give a float32 result accumulated in float32 (exact
    products of the rounded operands)."""
    mkl.use_float32_gemm(sgemm)
    assert mkl.float32_gemm() == sgemm
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(k, m) if transpose_a else (m, k)), dtype)
    b = jnp.asarray(rng.normal(size=(n, k) if transpose_b else (k, n)), dtype)
    product = jax.jit(mkl.gemm, static_argnames=("transpose_a", "transpose_b"))
    got = product(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    want = (a.T if transpose_a else a) @ (b.T if transpose_b else b)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@needs_mkl
def test_gemm_names_bad_operands():
    with pytest.raises(
        ValueError, match=r"two bfloat16 matrices, got bfloat16\(2, 3\) and float32"
    ):
        mkl.gemm(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"got float16"):
        mkl.gemm(jnp.ones((2, 3), jnp.float16), jnp.ones((3, 4), jnp.float16))
    with pytest.raises(ValueError, match=r"contracted sizes differ \(3 and 5\)"):
        mkl.gemm(jnp.ones((2, 3)), jnp.ones((5, 4)))


@needs_mkl
def test_choose_gemm(float32_gemm_kept):
    assert matmul.choose_gemm("tpu", 8, "mkl") == "dot"
    assert matmul.choose_gemm("cpu", 1, "xla") == "cpu"
    assert matmul.choose_gemm("cpu", 1, "auto") == "mkl"
    assert matmul.choose_gemm("cpu", 1, "mkl") == "mkl"
    assert mkl.float32_gemm() == "mkl"
    assert matmul.choose_gemm("cpu", 8, "auto") == "cpu"  # XLA would gather the operands
    with pytest.raises(config.ConfigError, match=r"model\.cpu_matmul: mkl: the mesh has 8 devices"):
        matmul.choose_gemm("cpu", 8, "mkl")


@needs_mkl
@needs_openblas
@pytest.mark.parametrize(
    "vendor, default", [("GenuineIntel", "mkl"), ("AuthenticAMD", "openblas"), ("", "openblas")]
)
def test_auto_takes_openblas_sgemm_off_intel(vendor, default, monkeypatch, float32_gemm_kept):
    """MKL does not run its tuned sgemm on other vendors' CPUs (benchmarks/NOTES.md, change 24)."""
    monkeypatch.setattr(mkl, "cpu_vendor", lambda: vendor)
    assert matmul.choose_gemm("cpu", 1, "auto") == "mkl"
    assert mkl.float32_gemm() == default
    assert matmul.choose_gemm("cpu", 1, "openblas") == "mkl"
    assert mkl.float32_gemm() == "openblas"
    with pytest.raises(ValueError, match=r"'blis' is not one of \('mkl', 'openblas'\)"):
        mkl.use_float32_gemm("blis")


@needs_mkl
def test_without_openblas_auto_keeps_mkl_and_openblas_is_refused(monkeypatch, float32_gemm_kept):
    monkeypatch.setattr(mkl, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(mkl, "openblas", lambda: "OpenBLAS is not installed (pip install x)")
    assert matmul.choose_gemm("cpu", 1, "auto") == "mkl"
    assert mkl.float32_gemm() == "mkl"
    with pytest.raises(config.ConfigError, match=r"cpu_matmul: openblas: OpenBLAS is not inst"):
        matmul.choose_gemm("cpu", 1, "openblas")


def test_without_mkl_auto_falls_back_and_mkl_is_refused(monkeypatch):
    monkeypatch.setattr(mkl, "library_path", lambda: None)
    mkl.unavailable_reason.cache_clear()
    try:
        assert mkl.unavailable_reason() == "MKL is not installed (pip install 'maxlm[mkl]')"
        assert matmul.choose_gemm("cpu", 1, "auto") == "cpu"
        with pytest.raises(config.ConfigError, match=r"cpu_matmul: mkl: MKL is not installed"):
            matmul.choose_gemm("cpu", 1, "mkl")
    finally:
        monkeypatch.undo()
        mkl.unavailable_reason.cache_clear()


@needs_mkl
def test_a_missing_compiler_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("MAXLM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler'"):
        mkl.compiled_handler()
    assert not list(tmp_path.iterdir())


@needs_mkl
@pytest.mark.parametrize(
    "tie_embeddings, dtype", [(False, "float32"), (True, "float32"), (False, "bfloat16")]
)
def test_train_steps_with_mkl_equal_xla(tie_embeddings, dtype, float32_gemm_kept):
    """Three train steps of a tiny LLaMA on one CPU device: the MKL products (float32 ones by
    MKL's and by OpenBLAS's sgemm) give the losses, gradient norms and parameters of XLA:CPU's
    own, within float32 rounding (bfloat16 compute: within its rounding; XLA:CPU runs some of
    those products in float32)."""
    routes = ["xla", "mkl"]
    if dtype == "float32" and "openblas" in mkl.float32_gemms():
        routes.append("openblas")
    results = []
    for route in routes:
        cfg = config.load(None, [
            "model.vocab_size=96", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
            "model.num_kv_heads=2", "model.mlp_dim=48", "train.seq_len=32",
            "train.global_batch_size=4", "train.loss_chunk=16", "mesh.data=1",
            f"model.tie_embeddings={tie_embeddings}", f"model.cpu_matmul={route}",
            f"model.dtype={dtype}",
        ])  # fmt: skip
        mesh = mesh_lib.make(cfg.mesh, devices=jax.devices()[:1])
        steps = train_step.build(cfg, mesh)
        hlo = steps.train.as_text()
        calls = hlo.count(f'custom_call_target="{TARGETS[dtype]}"')
        adding = hlo.count(f'custom_call_target="{TARGETS[dtype]}_add"')
        attention_calls = hlo.count('custom_call_target="maxlm_mkl_attention')  # and _grad
        state = state_lib.init(cfg, steps.optimizer, steps.blueprint)
        batch = jax.device_put(packed_batch(4, 32, 96, seed=0), steps.batch_sharding)
        history = []
        for _ in range(3):
            state, metrics = steps.train(state, batch)
            history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        results.append((history, jax.device_get(state.params), (calls, adding, attention_calls)))
    (xla_history, xla_params, xla_calls), *by_mkl = results
    assert xla_calls == (0, 0, 0)
    history_rtol, atol = (2e-5, 1e-6) if dtype == "float32" else (1e-2, 1e-3)
    for mkl_history, mkl_params, mkl_calls in by_mkl:
        # the scanned layer body: 7 forward products (q, k, v, o, gate, up, down), 14 backward
        # (one d(kernel) each; d(x) of q/k/v and of gate/up summed in place: 3 adding); the
        # head loss: 3 (d(head) summed over the chunks in place: 1 adding)
        assert mkl_calls == (20, 4, 2)  # attention's forward and backward kernels
        np.testing.assert_allclose(mkl_history, xla_history, rtol=history_rtol)
        for got, want in zip(jax.tree.leaves(mkl_params), jax.tree.leaves(xla_params), strict=True):
            np.testing.assert_allclose(
                got, want, rtol=1e-4 if dtype == "float32" else 1e-2, atol=atol
            )


@needs_mkl
@pytest.mark.parametrize(
    ("length", "second_document", "padding"), [(300, 130, 280), (1100, 600, 1050)]
)
def test_attention_equals_xla_attention(length: int, second_document: int, padding: int):
    """maxlm.mkl.attention against the xla path of attention.attend, output and gradients:
    grouped query heads, packed documents with padding, lengths that are not multiples of the
    64-row tiles. At 1100 the forward pass runs over three 512-key blocks: the first document's
    late rows rescale their running softmax, and the second document's rows meet a whole key
    block with no allowed key (their running max is still -inf)."""
    rng = np.random.default_rng(0)
    batch, heads, kv_heads, head_dim = 2, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
    k, v = (
        jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32)
        for _ in range(2)
    )
    segments = np.ones((batch, length), np.int32)
    segments[:, second_document:] = 2
    segments[0, padding:] = 0
    segments = jnp.asarray(segments)
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(q, k, v, fused):
        out = mkl.attention(q, k, v, segments) if fused else attention.attend(q, k, v, segments)
        return jnp.sum(out * weights), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (_, want), want_grads = grad(q, k, v, False)
    (_, got), got_grads = grad(q, k, v, True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5)
    hlo = jax.jit(mkl.attention).lower(q, k, v, segments).compile().as_text()
    assert 'custom_call_target="maxlm_mkl_attention"' in hlo


@needs_mkl
def test_bfloat16_attention_is_float32_attention_rounded():
    """bfloat16 q, k, v: maxlm.mkl.attention computes in float32 and hands back bfloat16, so its
    output and gradients are the float32 xla path's on the same (bf16-exact) inputs, rounded."""
    rng = np.random.default_rng(1)
    batch, length, heads, kv_heads, head_dim = 2, 200, 4, 2, 16
    q, k, v, weights = (
        jnp.asarray(rng.normal(size=(batch, length, n, head_dim)), jnp.bfloat16)
        for n in (heads, kv_heads, kv_heads, heads)
    )
    segments = jnp.asarray(np.repeat([[1] * 120 + [2] * 70 + [0] * 10], batch, 0), jnp.int32)

    def loss(q, k, v, fused):
        out = mkl.attention(q, k, v, segments) if fused else attention.attend(q, k, v, segments)
        return jnp.sum(out.astype(jnp.float32) * weights.astype(jnp.float32)), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    as_float32 = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, want), want_grads = grad(*as_float32, False)
    (_, got), got_grads = grad(q, k, v, True)
    assert got.dtype == jnp.bfloat16
    assert [g.dtype for g in got_grads] == [jnp.bfloat16] * 3
    rounding = 2.0**-8  # bfloat16 keeps 8 significant bits
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=rounding, atol=1e-6)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        # the backward pass reads the output back in bfloat16: one more rounding inside
        np.testing.assert_allclose(
            got_grad.astype(np.float32), want_grad, rtol=4 * rounding, atol=4 * rounding
        )


@needs_mkl
def test_cross_entropy_grad_equals_numpy():
    """The head loss's softmax kernel: log-sum-exp, target logits and the gradient of
    ce + w_z log_z^2 against float64 numpy, zero in masked rows; a target id outside the
    vocabulary is an error naming it, not a read out of bounds."""
    rng = np.random.default_rng(3)
    rows, vocab, z_loss_weight = 37, 1000, 1e-2
    logits = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, rows).astype(np.int32)
    mask = rng.random(rows) > 0.3
    call = jax.jit(lambda *args: mkl.cross_entropy_grad(*args, z_loss_weight))
    grad, log_z, target_logit = call(logits, targets, mask)
    exact = logits.astype(np.float64)
    want_log_z = np.log(np.exp(exact - exact.max(1, keepdims=True)).sum(1)) + exact.max(1)
    want = np.exp(exact - want_log_z[:, None]) * (1 + 2 * z_loss_weight * want_log_z)[:, None]
    want[np.arange(rows), targets] -= 1
    want[~mask] = 0
    np.testing.assert_allclose(log_z, want_log_z, rtol=1e-6)
    np.testing.assert_array_equal(target_logit, logits[np.arange(rows), targets])
    np.testing.assert_allclose(grad, want, atol=1e-6)
    targets[5] = vocab
    with pytest.raises(Exception, match="a target id is outside the vocabulary"):
        jax.block_until_ready(call(logits, targets, mask))

"""maxlm.matmul: the CPU-layout and MKL products equal plain einsums, values and gradients."""

import contextlib
import functools
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import matmul

SPECS = {
    "BTD,DNH->BTNH": ((2, 3, 8), (8, 4, 5)),
    "BTNH,NHD->BTD": ((2, 3, 4, 5), (4, 5, 8)),
    "BTD,DF->BTF": ((2, 3, 8), (8, 6)),
}


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gemm", ["cpu", "mkl"])
def test_cpu_einsum_equals_einsum(spec, dtype, gemm):
    x_shape, w_shape = SPECS[spec]
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], x_shape).astype(dtype)
    w = jax.random.normal(keys[1], w_shape)  # float32 parameters, compute in x's dtype

    def loss(x, w, gemm):
        y = matmul.einsum(spec, x, w, dtype, gemm=gemm)
        assert y.dtype == dtype
        return jnp.sum(y.astype(jnp.float32) * jnp.arange(y.size).reshape(y.shape) / y.size)

    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(x, w, "dot")
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(x, w, gemm)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == e.dtype
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(e, np.float32), rtol=tolerance, atol=tolerance
        )


def test_cpu_layouts_reach_ynnpack_for_the_weight_gradient():
    """The point of the module: on XLA:CPU, no dot of the backward pass falls back to XLA's
    generic path (it would contract the left operand's first axis)."""
    x, w = jnp.ones((64, 32)), jnp.ones((32, 48))

    def loss(x, w):
        return jnp.sum(matmul.einsum("MK,KN->MN", x, w, jnp.float32, gemm="cpu"))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    assert "lhs_contracting_dims={0}" not in hlo


def test_einsum_refuses_other_shapes():
    with pytest.raises(ValueError, match="not of the form"):
        matmul.einsum("BD,BF->DF", jnp.ones((2, 3)), jnp.ones((2, 4)), jnp.float32, gemm="cpu")


@pytest.mark.parametrize("gemm", ["cpu", "mkl", "dot"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_project_equals_one_einsum_per_kernel(gemm, dtype):
    """q/k/v-shaped kernels (D,N,H), (D,K,H), (D,K,H) and a 2-D one, values and gradients."""
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (2, 3, 8)).astype(dtype)
    kernels = [
        jax.random.normal(keys[1], (8, 4, 5)),
        jax.random.normal(keys[2], (8, 2, 5)),
        jax.random.normal(keys[3], (8, 2, 5)),
        jax.random.normal(keys[4], (8, 6)),
    ]

    def weighted(outputs):
        return sum(
            jnp.sum(y.astype(jnp.float32) * jnp.arange(y.size).reshape(y.shape) / y.size) * (i + 1)
            for i, y in enumerate(outputs)
        )

    def separate(x, kernels):  # the reference, in float32
        letters = ["BTD,DNH->BTNH", "BTD,DKH->BTKH", "BTD,DKH->BTKH", "BTD,DF->BTF"]
        return weighted(
            [jnp.einsum(s, x.astype(jnp.float32), k) for s, k in zip(letters, kernels, strict=True)]
        )

    def together(x, kernels):
        outputs = matmul.project(x, kernels, dtype, gemm=gemm)
        assert [y.shape for y in outputs] == [(2, 3, *k.shape[1:]) for k in kernels]
        assert all(y.dtype == dtype for y in outputs)
        return weighted(outputs)

    want = jax.jit(jax.value_and_grad(separate, argnums=(0, 1)))(x, kernels)
    got = jax.jit(jax.value_and_grad(together, argnums=(0, 1)))(x, kernels)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        e = np.asarray(e, np.float32)
        np.testing.assert_allclose(
            np.asarray(g, np.float32), e, rtol=tolerance, atol=tolerance * np.abs(e).max()
        )
    assert got[1][0].dtype == dtype and all(k.dtype == jnp.float32 for k in got[1][1])


def test_project_shares_products_and_keeps_x_once():
    """On XLA:CPU the kernels share each product of the backward pass (d x and d kernels: 2,
    against 2 per kernel); with MKL each kernel has its own products, d x summed in place and
    nothing concatenated. Either way autodiff keeps one copy of x (not one per kernel)."""
    x = jnp.ones((16, 8))
    kernels = [jnp.ones((8, 4)), jnp.ones((8, 6)), jnp.ones((8, 2))]

    def loss(x, kernels, gemm):
        outputs = matmul.project(x, kernels, jnp.float32, gemm=gemm)
        return sum(jnp.sum(y) for y in outputs)

    products = re.compile(r" dot\(|custom_call_target=\"maxlm_mkl_gemm\"")
    added = re.compile(r"custom_call_target=\"maxlm_mkl_gemm_add\"")
    for gemm, dots, adds in (("cpu", 2, 0), ("mkl", 4, 2), ("dot", 6, 0)):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
        hlo = grad.lower(x, kernels, gemm).compile().as_text()
        assert (len(products.findall(hlo)), len(added.findall(hlo))) == (dots, adds), gemm
        assert gemm != "mkl" or " concatenate(" not in hlo
    for gemm in ("cpu", "mkl"):
        residuals = io.StringIO()
        with contextlib.redirect_stdout(residuals):
            loss_of_x = functools.partial(loss, kernels=kernels, gemm=gemm)
            jax.ad_checkpoint.print_saved_residuals(loss_of_x, x)
        lines = residuals.getvalue().splitlines()
        assert len([line for line in lines if line.startswith("f32[16,8]")]) == 1, lines

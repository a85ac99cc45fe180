"""Matrix products whose gradients keep the layouts XLA:CPU's fast kernels accept.

XLA:CPU hands a dot to YNNPACK only when the left operand is row-major with its contracted
dimension last, and the types are f32 x f32 -> f32 or bf16 x bf16 -> f32. Autodiff of
`x @ w` produces the weight gradient `x^T @ g` as a dot contracting the left operand's *first*
dimension; XLA then runs it on its slow generic path and, to feed it, writes the gradient `g`
transposed (a strided copy as large as the activations). `matmul` computes the same products
with its own backward pass: the transposed activation and weight are materialized explicitly
(kept from being folded back into the dot by an optimization barrier, or for bfloat16 saved
transposed by the forward pass), every dot accumulates in float32, and results are cast
afterwards (measurements: benchmarks/NOTES.md). `project` runs projections that share an input
(q/k/v, gate/up) as one such product, so the input is kept and transposed once. Where Intel MKL
is installed, float32 and bfloat16 products on a one-device CPU mesh go to MKL instead
(`maxlm.mkl`; float32 ones to OpenBLAS's sgemm on non-Intel CPUs), which takes transposed
operands as they are and runs `project`'s products one per kernel. Other platforms use plain
dots: their compilers choose layouts well, and a barrier would only cost a copy.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from maxlm import mkl
from maxlm.config import ConfigError

# How products are computed: "dot" plain dots (TPU/GPU), "cpu" XLA:CPU dots with the layouts
# described above, "mkl" float32 and bfloat16 products by MKL (float16 as "cpu").
Gemm = Literal["dot", "cpu", "mkl"]


def choose_gemm(
    platform: str, devices: int, requested: Literal["auto", "mkl", "openblas", "xla"]
) -> Gemm:
    """The products' route for a model on `devices` devices of `platform`; `requested` is
    `model.cpu_matmul`. MKL's custom call is not partitioned by XLA, so it takes one device.
    On the "mkl" route this also sets whose sgemm runs the float32 products, process-wide
    (`maxlm.mkl.use_float32_gemm`): `requested`, or for "auto" this CPU's default."""
    if platform != "cpu":
        return "dot"
    if requested == "xla":
        return "cpu"
    reason = mkl.unavailable_reason()
    if reason is None and devices > 1:
        reason = f"the mesh has {devices} devices; MKL's products run on one"
    if reason is None and requested == "openblas" and "openblas" not in mkl.float32_gemms():
        reason = str(mkl.openblas())
    if reason is None:
        mkl.use_float32_gemm(mkl.default_float32_gemm() if requested == "auto" else requested)
        return "mkl"
    if requested != "auto":
        raise ConfigError(f"model.cpu_matmul: {requested}: {reason}")
    logging.getLogger(__name__).info("matmuls by XLA:CPU, not MKL: %s", reason)
    return "cpu"


def by_mkl(gemm: Gemm, dtype: DTypeLike) -> bool:
    """Whether a product in `dtype` on this route runs in MKL (float16 stays in XLA:CPU)."""
    return gemm == "mkl" and jnp.dtype(dtype) in mkl.TARGETS


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def transposed(a: jax.Array) -> jax.Array:
    """a.T materialized row-major: the barrier keeps XLA from folding it into the next dot."""
    return jax.lax.optimization_barrier(a.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, out_dtype: DTypeLike) -> jax.Array:
    """x (M,K) @ w (K,N) in x's dtype (w is cast to it), float32 accumulation, -> out_dtype."""
    return _dot(x, w.astype(x.dtype)).astype(out_dtype)


def _matmul_fwd(
    x: jax.Array, w: jax.Array, out_dtype: DTypeLike
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    # bfloat16: keep x^T from the forward pass. XLA:CPU upcasts a bf16 dot to f32 when its left
    # operand comes out of a barrier, but not when it comes from the scan's saved residuals.
    saved = x.T if x.dtype == jnp.bfloat16 else x
    return matmul(x, w, out_dtype), (saved, w)


def _matmul_bwd(
    out_dtype: DTypeLike, residuals: tuple[jax.Array, jax.Array], grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    saved, w = residuals
    x_t = saved if saved.dtype == jnp.bfloat16 else transposed(saved)
    grad = grad.astype(x_t.dtype)
    grad_x = _dot(grad, transposed(w.astype(x_t.dtype))).astype(x_t.dtype)
    grad_w = _dot(x_t, grad).astype(w.dtype)
    return grad_x, grad_w


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def mkl_matmul(x: jax.Array, w: jax.Array, out_dtype: DTypeLike, contracted: int) -> jax.Array:
    """x (..., K_1..K_c) @ w (K_1..K_c, N...) by MKL (float32 or bfloat16 x), c = `contracted`
    -> (..., N...). x and w are kept as given, so the backward pass reads the scan's own slice
    of the parameters and the very tensor an earlier op may keep too (the attention output,
    which `maxlm.mkl.attention` keeps: JAX saves it once), not reshaped or cast copies."""
    rows, w2 = _as_rows(x, w, contracted), _as_matrix(w, x, contracted)
    y = mkl.gemm(rows, w2).astype(out_dtype)
    return y.reshape(*x.shape[: x.ndim - contracted], *w.shape[contracted:])


def _as_rows(x: jax.Array, w: jax.Array, contracted: int) -> jax.Array:
    return x.reshape(-1, math.prod(w.shape[:contracted]))


def _as_matrix(w: jax.Array, x: jax.Array, contracted: int = 1) -> jax.Array:
    return w.reshape(math.prod(w.shape[:contracted]), -1).astype(x.dtype)


def _mkl_matmul_fwd(
    x: jax.Array, w: jax.Array, out_dtype: DTypeLike, contracted: int
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return mkl_matmul(x, w, out_dtype, contracted), (x, w)


def _mkl_matmul_bwd(
    out_dtype: DTypeLike,
    contracted: int,
    residuals: tuple[jax.Array, jax.Array],
    grad: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    rows = _as_rows(x, w, contracted)
    grad = grad.astype(x.dtype).reshape(rows.shape[0], -1)
    grad_x = mkl.gemm(grad, _as_matrix(w, x, contracted), transpose_b=True)
    grad_w = mkl.gemm(rows, grad, transpose_a=True)
    return grad_x.reshape(x.shape).astype(x.dtype), grad_w.reshape(w.shape).astype(w.dtype)


mkl_matmul.defvjp(_mkl_matmul_fwd, _mkl_matmul_bwd)


def einsum(spec: str, x: jax.Array, w: jax.Array, out_dtype: DTypeLike, *, gemm: Gemm) -> jax.Array:
    """jnp.einsum(spec, x, w) for a layer: x's trailing letters are contracted with w's
    leading ones and the result is x's other letters then w's (e.g. "BTD,DNH->BTNH").
    On CPU (`gemm` "cpu" or "mkl") it runs as one 2-D product; otherwise as a plain einsum."""
    if gemm == "dot":
        return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=out_dtype)
    inputs, out = spec.split("->")
    x_letters, w_letters = inputs.split(",")
    contracted = (len(x_letters) + len(w_letters) - len(out)) // 2
    if (
        x_letters[len(x_letters) - contracted :] != w_letters[:contracted]
        or out != x_letters[: len(x_letters) - contracted] + w_letters[contracted:]
    ):
        raise ValueError(f"einsum {spec!r} is not of the form ...K,KN->...N")
    if by_mkl(gemm, x.dtype):
        return mkl_matmul(x, w, out_dtype, contracted)
    x2 = _as_rows(x, w, contracted)
    y2 = matmul(x2, w.reshape(x2.shape[1], -1), out_dtype)
    return y2.reshape(*x.shape[: x.ndim - contracted], *w.shape[contracted:])


def project(
    x: jax.Array, kernels: Sequence[jax.Array], out_dtype: DTypeLike, *, gemm: Gemm
) -> list[jax.Array]:
    """x (..., K) times each kernel (K, *out_i) -> (..., *out_i), as `einsum` would compute them
    one by one. On XLA:CPU's route they run as one product against the kernels side by side: x
    is saved for the backward pass (and transposed there) once instead of once per kernel, and
    its gradient is one dot. MKL's route keeps x once too, with one product per kernel
    (`mkl_project`)."""
    if gemm == "dot":
        return [
            jnp.tensordot(x, kernel.astype(x.dtype), axes=1, preferred_element_type=out_dtype)
            for kernel in kernels
        ]
    x2 = x.reshape(-1, x.shape[-1])
    parts: Sequence[jax.Array]
    if by_mkl(gemm, x.dtype):
        parts = mkl_project(x2, tuple(kernels), out_dtype)
    else:
        columns = [kernel.reshape(kernel.shape[0], -1) for kernel in kernels]
        y = matmul(x2, jnp.concatenate(columns, axis=1), out_dtype)
        parts = _split_columns(y, tuple(itertools.accumulate(c.shape[1] for c in columns)))
    return [
        part.reshape(*x.shape[:-1], *kernel.shape[1:])
        for part, kernel in zip(parts, kernels, strict=True)
    ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mkl_project(
    x: jax.Array, kernels: tuple[jax.Array, ...], out_dtype: DTypeLike
) -> tuple[jax.Array, ...]:
    """x (M,K) @ each kernel (K, ...) by MKL -> (M, N_i), x and the kernels (as given) saved
    once. No kernels side by side: MKL needs no single product to be fast, and concatenating
    the kernels, their gradients and the outputs' gradients cost copies (benchmarks/NOTES.md,
    change 19)."""
    return tuple(mkl.gemm(x, _as_matrix(w, x)).astype(out_dtype) for w in kernels)


def _mkl_project_fwd(x: jax.Array, kernels: tuple[jax.Array, ...], out_dtype: DTypeLike) -> Any:
    return mkl_project(x, kernels, out_dtype), (x, kernels)


def _mkl_project_bwd(out_dtype: DTypeLike, residuals: Any, grads: tuple[jax.Array, ...]) -> Any:
    x, kernels = residuals
    terms = [(g.astype(x.dtype), _as_matrix(w, x)) for g, w in zip(grads, kernels, strict=True)]
    grad_x = mkl.gemm(*terms[0], transpose_b=True)
    for grad, w in terms[1:]:
        grad_x = mkl.gemm(grad, w, transpose_b=True, add=grad_x)
    grad_kernels = tuple(
        mkl.gemm(x, grad, transpose_a=True).reshape(w.shape).astype(w.dtype)
        for (grad, _), w in zip(terms, kernels, strict=True)
    )
    return grad_x.astype(x.dtype), grad_kernels


mkl_project.defvjp(_mkl_project_fwd, _mkl_project_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _split_columns(y: jax.Array, ends: tuple[int, ...]) -> list[jax.Array]:
    """y (M, N) cut into column blocks ending at `ends`. Its backward pass concatenates the
    blocks' gradients (autodiff would pad each to (M, N) and add them up)."""
    return [y[:, start:end] for start, end in itertools.pairwise((0, *ends))]


def _split_columns_fwd(y: jax.Array, ends: tuple[int, ...]) -> tuple[list[jax.Array], None]:
    return _split_columns(y, ends), None


def _split_columns_bwd(ends: tuple[int, ...], _: None, grads: list[jax.Array]) -> tuple[jax.Array]:
    return (jnp.concatenate(grads, axis=1),)


_split_columns.defvjp(_split_columns_fwd, _split_columns_bwd)

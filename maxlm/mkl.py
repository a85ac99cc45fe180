"""Intel MKL's GEMM as an XLA:CPU custom call (the `mkl` extra; x86-64 Linux).

On this project's CPU, MKL's sgemm runs the layers' and the output head's float32 products at
290-320 GFLOP/s where XLA:CPU's own (YNNPACK) reaches 170-280, and its bf16 x bf16 -> f32 GEMM
(AMX) beats XLA:CPU's bf16 too (benchmarks/NOTES.md, changes 15 and 16).
XLA's built-in oneDNN route gives up YNNPACK's other fusions (change 9), so the products go to
MKL one at a time through jax's FFI; `gemm(..., add=)` adds into a running sum in place
(change 19). `attention` is causal document-masked flash attention on MKL's products (float32,
for float32 or bfloat16 inputs), about 3x XLA:CPU's attention (changes 17-18, 25);
`cross_entropy_grad` is the fused head loss's softmax and gradient in one pass over each
chunk's logits (change 22).
On CPUs not made by Intel, MKL does not take its tuned code paths, so the float32 products
(attention's included) call OpenBLAS's sgemm instead where the `scipy-openblas32` wheel is
installed (`use_float32_gemm`, chosen by `model.cpu_matmul`; change 24); bfloat16 products
and exp stay MKL's.
`mkl_kernels.cc` holds the handlers: it is compiled with the system C++ compiler against jaxlib's
FFI headers on first use (a few seconds; cached), MKL and OpenBLAS run sequential, and the work
is split over XLA's own intra-op threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = Path(__file__).with_name("mkl_kernels.cc")
TARGETS = {jnp.dtype(jnp.float32): "maxlm_mkl_gemm", jnp.dtype(jnp.bfloat16): "maxlm_mkl_gemm_bf16"}
ADD_SUFFIX = "_add"  # the same product plus an addend, updated in place
HANDLERS = {  # custom-call target -> symbol in mkl_kernels.cc
    "maxlm_mkl_gemm": "MaxlmMklGemm",
    "maxlm_mkl_gemm_bf16": "MaxlmMklGemmBf16",
    "maxlm_mkl_gemm_add": "MaxlmMklGemmAdd",
    "maxlm_mkl_gemm_bf16_add": "MaxlmMklGemmAddBf16",
    "maxlm_mkl_attention": "MaxlmAttentionForward",
    "maxlm_mkl_attention_grad": "MaxlmAttentionBackward",
    "maxlm_mkl_cross_entropy_grad": "MaxlmCrossEntropyGrad",
}
LIBRARY = "libmkl_rt.so"  # .so.2 up to MKL 2025, .so.3 since
SEQUENTIAL = 1  # MKL_THREADING_SEQUENTIAL
CACHE_DIR = "~/.cache/maxlm/kernels"
FLOAT32_GEMMS = ("mkl", "openblas")  # whose sgemm the float32 products may run on
_loaded: dict[str, Any] = {}  # MKL, the handler, and whose sgemm the handler calls now


def installable() -> bool:
    """Whether the `mkl` wheel exists for this machine (x86-64 Linux)."""
    return sys.platform == "linux" and platform.machine() == "x86_64"


def library_path() -> Path | None:
    """MKL's single dynamic library as installed by the `mkl` wheel, or None."""
    try:
        files = importlib.metadata.distribution("mkl").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith(LIBRARY):
            return Path(str(file.locate())).resolve()
    return None


def compiled_handler() -> Path:
    """The handler's shared object, built once per source, jaxlib version and compiler command."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} to build {SOURCE.name} (set CXX)")
    source = SOURCE.read_bytes()
    flags = ["-O3", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w"]
    command = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE)]
    key = hashlib.sha256(source + " ".join([jaxlib.__version__, *command]).encode()).hexdigest()
    cache = Path(os.environ.get("MAXLM_KERNEL_CACHE", CACHE_DIR)).expanduser()
    built = cache / f"mkl_kernels-{key[:16]}.so"
    if built.exists():
        return built
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        partial = Path(scratch) / built.name
        result = subprocess.run([*command, "-o", str(partial)], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, built)  # atomic: concurrent processes may build it too
    return built


@functools.cache
def unavailable_reason() -> str | None:
    """None once MKL is loaded and the custom call registered; otherwise why it is not."""
    path = library_path()
    if path is None:
        return "MKL is not installed (pip install 'maxlm[mkl]')"
    try:
        mkl = ctypes.CDLL(str(path))
        # must precede any other MKL call; XLA's threads run the blocks (mkl_kernels.cc)
        if mkl.MKL_Set_Threading_Layer(SEQUENTIAL) != SEQUENTIAL:
            return f"{path} would not switch to sequential threading"
        handler = ctypes.CDLL(str(compiled_handler()))
    except (OSError, RuntimeError) as error:
        return str(error)
    handler.maxlm_set_mkl(*(
        ctypes.cast(getattr(mkl, name), ctypes.c_void_p)
        for name in ("cblas_sgemm", "cblas_gemm_bf16bf16f32", "vsExp")
    ))  # fmt: skip
    for name, symbol in HANDLERS.items():
        capsule = jax.ffi.pycapsule(getattr(handler, symbol))
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    _loaded["mkl"], _loaded["handler"] = mkl, handler
    _set_float32_gemm(default_float32_gemm())
    return None


def cpu_vendor() -> str:
    """The CPU's vendor id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"; "" if unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    found = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.MULTILINE)
    return found.group(1) if found else ""


@functools.cache
def openblas() -> ctypes.CDLL | str:
    """OpenBLAS (the `scipy-openblas32` wheel: LP64, symbols prefixed `scipy_`), set to run
    single-threaded in its caller as MKL does here; or why it cannot be loaded."""
    try:
        import scipy_openblas32
    except ImportError:
        return "OpenBLAS is not installed (pip install 'maxlm[mkl]')"
    path = Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        return str(error)
    library.scipy_openblas_set_num_threads(1)  # XLA's threads run the blocks
    return library


def default_float32_gemm() -> str:
    """MKL's sgemm on Intel CPUs; OpenBLAS's elsewhere where installed. On other vendors' CPUs
    MKL does not take its tuned code paths: on an AMD EPYC (Zen 3) its sgemm ran one core at
    40-78 GFLOP/s against OpenBLAS's 70-82 (benchmarks/NOTES.md, change 24)."""
    if cpu_vendor() == "GenuineIntel" or isinstance(openblas(), str):
        return "mkl"
    return "openblas"


def float32_gemms() -> list[str]:
    """The sgemms the float32 products can run on here (MKL's always, with the handler)."""
    return [name for name in FLOAT32_GEMMS if name == "mkl" or not isinstance(openblas(), str)]


def float32_gemm() -> str:
    """Whose sgemm the float32 products (and attention's) run on now: "mkl" or "openblas"."""
    _require("float32_gemm")
    return _loaded["float32"]


def use_float32_gemm(library: str) -> None:
    """Run float32 products, attention's included, by `library`'s sgemm ("mkl" or "openblas")
    from now on, process-wide (compiled steps look it up per call); bfloat16 products and
    exp stay MKL's, which OpenBLAS lacks."""
    _require("use_float32_gemm")
    if library not in FLOAT32_GEMMS:
        raise ValueError(f"maxlm.mkl.use_float32_gemm: {library!r} is not one of {FLOAT32_GEMMS}")
    _set_float32_gemm(library)


def _set_float32_gemm(library: str) -> None:
    if library == "openblas":
        loaded = openblas()
        if isinstance(loaded, str):
            raise RuntimeError(f"maxlm.mkl: openblas: {loaded}")
        function = loaded.scipy_cblas_sgemm
    else:
        function = _loaded["mkl"].cblas_sgemm
    _loaded["handler"].maxlm_set_sgemm(ctypes.cast(function, ctypes.c_void_p))
    _loaded["float32"] = library


def _require(caller: str) -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"maxlm.mkl.{caller}: {reason}")


def gemm(
    a: jax.Array,
    b: jax.Array,
    *,
    transpose_a: bool = False,
    transpose_b: bool = False,
    add: jax.Array | None = None,
) -> jax.Array:
    """op(a) @ op(b) in float32 for float32 or bfloat16 matrices (both alike), op transposing
    where asked, by MKL on XLA:CPU. With `add` (float32, the product's shape) the result is
    `add` plus the product, written over `add`'s buffer where XLA can give it up (a running
    sum: no separate pass to add)."""
    _require("gemm")
    if a.dtype != b.dtype or a.dtype not in TARGETS or a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"maxlm.mkl.gemm takes two float32 or two bfloat16 matrices, got "
                         f"{a.dtype}{a.shape} and {b.dtype}{b.shape}")  # fmt: skip
    m = a.shape[1] if transpose_a else a.shape[0]
    k = a.shape[0] if transpose_a else a.shape[1]
    k_b, n = b.shape[::-1] if transpose_b else b.shape
    if k != k_b:
        raise ValueError(f"maxlm.mkl.gemm: contracted sizes differ ({k} and {k_b})")
    result = jax.ShapeDtypeStruct((m, n), jnp.float32)
    if add is None:
        call = jax.ffi.ffi_call(TARGETS[a.dtype], result, vmap_method="sequential")
        return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    if add.shape != result.shape or add.dtype != jnp.float32:
        raise ValueError(f"maxlm.mkl.gemm: add must be float32{result.shape}, "
                         f"got {add.dtype}{add.shape}")  # fmt: skip
    call = jax.ffi.ffi_call(
        TARGETS[a.dtype] + ADD_SUFFIX,
        result,
        vmap_method="sequential",
        input_output_aliases={2: 0},
    )
    return call(a, b, add, transpose_a=transpose_a, transpose_b=transpose_b)


def cross_entropy_grad(
    logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss_weight: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For float32 logits (M,V), int targets (M,) and a mask (M,): d(ce + z_loss_weight *
    log_z^2)/d logits (zero in masked rows), each row's log_z and target logit. One pass over
    memory, the gradient written over the logits' buffer where XLA can give it up: what the
    fused head loss (maxlm/loss.py) computes with three passes otherwise."""
    _require("cross_entropy_grad")
    rows = logits.shape[0]
    if logits.dtype != jnp.float32 or logits.ndim != 2 or targets.shape != (rows,):
        raise ValueError(
            f"maxlm.mkl.cross_entropy_grad takes float32 (M,V) logits and (M,) targets, "
            f"got {logits.dtype}{logits.shape} and {targets.shape}"
        )
    per_row = jax.ShapeDtypeStruct((rows,), jnp.float32)
    call = jax.ffi.ffi_call(
        "maxlm_mkl_cross_entropy_grad",
        (jax.ShapeDtypeStruct(logits.shape, jnp.float32), per_row, per_row),
        vmap_method="sequential",
        input_output_aliases={0: 0},
    )
    grad, log_z, target_logit = call(
        logits,
        targets.astype(jnp.int32),
        mask.astype(jnp.int32),
        z_loss_weight=np.float32(z_loss_weight),
    )
    return grad, log_z, target_logit


def _float32(*arrays: jax.Array) -> list[jax.Array]:
    return [x.astype(jnp.float32) for x in arrays]


def _attention_call(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> Any:
    _require("attention")
    batch, length, heads, _ = q.shape
    shapes = (
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        jax.ShapeDtypeStruct((batch, heads, length), jnp.float32),  # each row's log-sum-exp
    )
    call = jax.ffi.ffi_call("maxlm_mkl_attention", shapes, vmap_method="sequential")
    out, log_sum_exp = call(*_float32(q, k, v), segment_ids)
    return out.astype(q.dtype), log_sum_exp


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Causal self-attention within documents (equal `segment_ids`), q (B,T,N,H) and k, v
    (B,T,K,H) with N a multiple of K; scale 1/sqrt(H). What `maxlm.attention.attend`'s xla
    path computes, without the (B,N,T,S) probabilities: the backward pass recomputes them
    block by block from each row's log-sum-exp. Computed in float32; bfloat16 inputs are
    converted on the way in, and the output and gradients are returned in the inputs' dtype
    (XLA:CPU's own bfloat16 attention was slower: benchmarks/NOTES.md, change 25)."""
    return _attention_call(q, k, v, segment_ids)[0]


def _attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> Any:
    out, log_sum_exp = _attention_call(q, k, v, segment_ids)
    return out, (q, k, v, segment_ids, out, log_sum_exp)


def _attention_bwd(residuals: Any, d_out: jax.Array) -> Any:
    q, k, v, segment_ids, out, log_sum_exp = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    call = jax.ffi.ffi_call("maxlm_mkl_attention_grad", shapes, vmap_method="sequential")
    q32, k32, v32, out32, d_out32 = _float32(q, k, v, out, d_out)
    grads = call(q32, k32, v32, segment_ids, out32, log_sum_exp, d_out32)
    return *(grad.astype(x.dtype) for grad, x in zip(grads, (q, k, v), strict=True)), None


attention.defvjp(_attention_fwd, _attention_bwd)

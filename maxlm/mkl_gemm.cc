// Intel MKL's GEMMs (float32, and bfloat16 with a float32 result) as XLA:CPU FFI custom calls
// (loaded and registered by maxlm/mkl.py).
//
// MKL runs sequential here: the product is split into row (or column) blocks that run on
// XLA's own intra-op thread pool, so MKL's threads and XLA's never compete for the cores.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// cblas_sgemm and cblas_gemm_bf16bf16f32 of MKL's LP64 interface (MKL_INT is 32-bit): the
// same arguments, operands of float or bfloat16 (MKL_BF16, 16-bit), a float32 result
using GemmFn = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int,
                        float, float*, int);
static GemmFn sgemm = nullptr, bf16_gemm = nullptr;

extern "C" void maxlm_set_gemms(void* f32, void* bf16) {
  sgemm = reinterpret_cast<GemmFn>(f32);
  bf16_gemm = reinterpret_cast<GemmFn>(bf16);
}

namespace {

template <ffi::DataType T>
using Matrix = ffi::Buffer<T, 2>;
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr int64_t kMinBlock = 64;  // smaller blocks run slower than one thread does

// Blocks of one product; whoever claims a block first (a pool thread or the caller) runs it,
// so the caller never waits on a pool that is busy with other work.
struct Blocks {
  std::vector<std::atomic<bool>> claimed;
  std::atomic<int> left;
  std::mutex mutex;
  std::condition_variable finished;
  explicit Blocks(int n) : claimed(n), left(n) {
    for (auto& flag : claimed) flag.store(false);
  }
};

template <ffi::DataType T>
ffi::Error Gemm(ffi::ThreadPool pool, Matrix<T> a, Matrix<T> b, ffi::Result<F32Matrix> c,
                bool transpose_a, bool transpose_b) {
  GemmFn gemm = T == ffi::DataType::F32 ? sgemm : bf16_gemm;
  if (gemm == nullptr) return ffi::Error::Internal("maxlm_mkl_gemm: MKL's gemm is not set");
  using Element = ffi::NativeType<T>;
  auto a_dims = a.dimensions(), b_dims = b.dimensions();
  int64_t m = transpose_a ? a_dims[1] : a_dims[0], k = transpose_a ? a_dims[0] : a_dims[1];
  int64_t k_b = transpose_b ? b_dims[1] : b_dims[0], n = transpose_b ? b_dims[0] : b_dims[1];
  if (k != k_b) return ffi::Error::InvalidArgument("maxlm_mkl_gemm: contracted sizes differ");
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (a.element_count() > kIntMax || b.element_count() > kIntMax || m * n > kIntMax) {
    return ffi::Error::InvalidArgument("maxlm_mkl_gemm: operands exceed MKL's 32-bit sizes");
  }
  int lda = static_cast<int>(a_dims[1]), ldb = static_cast<int>(b_dims[1]);
  int ldc = static_cast<int>(n);
  const Element* pa = a.typed_data();
  const Element* pb = b.typed_data();
  float* pc = c->typed_data();
  int op_a = transpose_a ? kTrans : kNoTrans, op_b = transpose_b ? kTrans : kNoTrans;

  bool by_rows = m >= n;
  int64_t extent = by_rows ? m : n;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int parts = static_cast<int>(std::clamp<int64_t>(extent / kMinBlock, 1, threads));
  int64_t per_part = ((extent + parts - 1) / parts + 15) / 16 * 16;
  auto run = [=](int part) {
    int64_t lo = part * per_part, hi = std::min(extent, lo + per_part);
    if (lo >= hi) return;
    int size = static_cast<int>(hi - lo);
    if (by_rows) {
      const Element* rows = transpose_a ? pa + lo : pa + lo * lda;
      gemm(kRowMajor, op_a, op_b, size, static_cast<int>(n), static_cast<int>(k), 1.0f, rows,
            lda, pb, ldb, 0.0f, pc + lo * ldc, ldc);
    } else {
      const Element* cols = transpose_b ? pb + lo * ldb : pb + lo;
      gemm(kRowMajor, op_a, op_b, static_cast<int>(m), size, static_cast<int>(k), 1.0f, pa,
            lda, cols, ldb, 0.0f, pc + lo, ldc);
    }
  };
  if (parts == 1) {
    run(0);
    return ffi::Error::Success();
  }
  auto blocks = std::make_shared<Blocks>(parts);
  auto claim = [blocks, run](int part) {
    if (blocks->claimed[part].exchange(true)) return;
    run(part);
    if (blocks->left.fetch_sub(1) == 1) {
      std::lock_guard<std::mutex> lock(blocks->mutex);
      blocks->finished.notify_all();
    }
  };
  for (int part = 1; part < parts; ++part) pool.Schedule([claim, part] { claim(part); });
  for (int part = 0; part < parts; ++part) claim(part);
  std::unique_lock<std::mutex> lock(blocks->mutex);
  blocks->finished.wait(lock, [&] { return blocks->left.load() == 0; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxlmMklGemm, Gemm<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<F32Matrix>()
                                  .Ret<F32Matrix>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxlmMklGemmBf16, Gemm<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Bf16Matrix>()
                                  .Arg<Bf16Matrix>()
                                  .Ret<F32Matrix>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

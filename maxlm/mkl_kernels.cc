// XLA:CPU FFI custom calls on Intel MKL (loaded and registered by maxlm/mkl.py): GEMMs (float32,
// and bfloat16 with a float32 result), and causal document-masked attention in float32.
//
// MKL runs sequential here: the product is split into row (or column) blocks that run on
// XLA's own intra-op thread pool, so MKL's threads and XLA's never compete for the cores.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// cblas_sgemm and cblas_gemm_bf16bf16f32 of MKL's LP64 interface (MKL_INT is 32-bit): the
// same arguments, operands of float or bfloat16 (MKL_BF16, 16-bit), a float32 result. The
// float32 one may be another LP64 CBLAS's sgemm (OpenBLAS's: maxlm_set_sgemm)
using GemmFn = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int,
                        float, float*, int);
// vsExp of MKL's vector math: y = exp(a) elementwise
using ExpFn = void (*)(int, const float*, float*);
// atomic: maxlm_set_sgemm may switch it while another thread's step runs; each call reads it once
static std::atomic<GemmFn> f32_gemm{nullptr};
static GemmFn bf16_gemm = nullptr;
static ExpFn vexp = nullptr;

extern "C" void maxlm_set_mkl(void* f32, void* bf16, void* exp) {
  f32_gemm.store(reinterpret_cast<GemmFn>(f32));
  bf16_gemm = reinterpret_cast<GemmFn>(bf16);
  vexp = reinterpret_cast<ExpFn>(exp);
}

extern "C" void maxlm_set_sgemm(void* f32) { f32_gemm.store(reinterpret_cast<GemmFn>(f32)); }

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

// c = op(a) @ op(b) + beta * c, op transposing where asked; c is (m, n) float32
template <ffi::DataType T>
ffi::Error Product(ffi::ThreadPool& pool, Matrix<T> a, Matrix<T> b, float* pc, float beta,
                   bool transpose_a, bool transpose_b) {
  GemmFn gemm = T == ffi::DataType::F32 ? f32_gemm.load() : bf16_gemm;
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
            lda, pb, ldb, beta, pc + lo * ldc, ldc);
    } else {
      const Element* cols = transpose_b ? pb + lo * ldb : pb + lo;
      gemm(kRowMajor, op_a, op_b, static_cast<int>(m), size, static_cast<int>(k), 1.0f, pa,
            lda, cols, ldb, beta, pc + lo, ldc);
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

template <ffi::DataType T>
ffi::Error Gemm(ffi::ThreadPool pool, Matrix<T> a, Matrix<T> b, ffi::Result<F32Matrix> c,
                bool transpose_a, bool transpose_b) {
  return Product<T>(pool, a, b, c->typed_data(), 0.0f, transpose_a, transpose_b);
}

// c = op(a) @ op(b) + addend; the result aliases the addend (maxlm/mkl.py), so a running sum
// is updated in place
template <ffi::DataType T>
ffi::Error GemmAdd(ffi::ThreadPool pool, Matrix<T> a, Matrix<T> b, F32Matrix addend,
                   ffi::Result<F32Matrix> c, bool transpose_a, bool transpose_b) {
  if (addend.element_count() != c->element_count()) {
    return ffi::Error::InvalidArgument("maxlm_mkl_gemm_add: the addend's shape differs");
  }
  float* pc = c->typed_data();
  if (pc != addend.typed_data()) {  // XLA gave the result a buffer of its own after all
    std::copy_n(addend.typed_data(), addend.element_count(), pc);
  }
  return Product<T>(pool, a, b, pc, 1.0f, transpose_a, transpose_b);
}

// Attention tiles: forward, 64 queries against up to 512 keys (a sequence of up to 512 needs no
// online rescaling); backward, 64 keys against up to 512 queries, so the products into d(k) and
// d(v) contract over many queries. Narrow tiles waste little on the causal diagonal; the long
// side keeps MKL's products large enough to run near full speed (benchmarks/NOTES.md, change 18).
constexpr int kQueryBlock = 64, kKeyBlock = 512, kKeyTile = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// f(0) ... f(tasks - 1) on the caller and the pool's threads, each task taken by the first free one
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int tasks, F f) {
  struct State {
    std::atomic<int> next{0};
    std::atomic<int> done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  auto worker = [state, tasks, f]() {
    int ran = 0;
    for (int task; (task = state->next.fetch_add(1)) < tasks; ++ran) f(task);
    if (ran && state->done.fetch_add(ran) + ran == tasks) {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->finished.notify_all();
    }
  };
  int helpers = static_cast<int>(std::min<int64_t>(pool.num_threads(), tasks)) - 1;
  for (int i = 0; i < helpers; ++i) pool.Schedule([worker] { worker(); });
  worker();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == tasks; });
}

// Keys k0 .. k0 + cols of query `query` left of the causal diagonal: the row's width (<= 0: none)
inline int CausalWidth(int query, int k0, int cols) { return std::min(cols, query - k0 + 1); }

// Row `scores` of a block, its first `width` keys (segment ids `keys`): minus `shift` where the
// key is in the query's document `segment`, -inf elsewhere. Returns the row's maximum.
inline float MaskRow(float* scores, int width, const int32_t* keys, int32_t segment, float shift) {
  float row_max = kNegInf;
#pragma omp simd reduction(max : row_max)
  for (int j = 0; j < width; ++j) {
    float value = keys[j] == segment ? scores[j] - shift : kNegInf;
    scores[j] = value;
    row_max = std::max(row_max, value);
  }
  return row_max;
}

using F32 = ffi::Buffer<ffi::F32>;
using I32 = ffi::Buffer<ffi::S32>;

// q (B,T,N,H) and k (B,T,K,H): sizes, row strides, query heads per key/value head, softmax scale
struct Dims {
  int B, T, N, H, K, group, ldq, ldk;
  float scale;
  Dims(const F32& q, const F32& k) {
    auto d = q.dimensions();
    B = static_cast<int>(d[0]), T = static_cast<int>(d[1]), N = static_cast<int>(d[2]);
    H = static_cast<int>(d[3]), K = static_cast<int>(k.dimensions()[2]);
    group = N / K, ldq = N * H, ldk = K * H;
    scale = 1.0f / std::sqrt(static_cast<float>(H));
  }
};

// Flash attention, causal within documents (equal segment ids), softmax scale 1/sqrt(H); grouped
// query heads share key/value head n / (N / K). One task per (batch row, query head) forward and
// per (batch row, key/value head) backward, so no two tasks write the same gradient rows.
// q (B,T,N,H), k and v (B,T,K,H), segment_ids (B,T) -> out (B,T,N,H), log-sum-exp (B,N,T)
ffi::Error Forward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, I32 segments,
                   ffi::Result<F32> out, ffi::Result<F32> lse) {
  const GemmFn sgemm = f32_gemm.load();
  if (sgemm == nullptr || vexp == nullptr) return ffi::Error::Internal("MKL is not set");
  const Dims dims(q, k);
  const float* pq = q.typed_data();
  const float* pk = k.typed_data();
  const float* pv = v.typed_data();
  const int32_t* seg = segments.typed_data();
  float* po = out->typed_data();
  float* pl = lse->typed_data();
  ParallelFor(pool, dims.B * dims.N, [=](int task) {
    int b = task / dims.N, n = task % dims.N, g = n / dims.group;
    std::vector<float> s(kQueryBlock * kKeyBlock), acc(kQueryBlock * dims.H);
    std::vector<float> m(kQueryBlock), l(kQueryBlock);
    const int32_t* sb = seg + b * dims.T;
    for (int q0 = 0; q0 < dims.T; q0 += kQueryBlock) {
      int rows = std::min(kQueryBlock, dims.T - q0);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      const float* qb = pq + (static_cast<int64_t>(b) * dims.T + q0) * dims.ldq + n * dims.H;
      int end = q0 + rows;
      for (int k0 = 0; k0 < end; k0 += kKeyBlock) {
        int cols = std::min(kKeyBlock, end - k0);
        const float* kb = pk + (static_cast<int64_t>(b) * dims.T + k0) * dims.ldk + g * dims.H;
        const float* vb = pv + (static_cast<int64_t>(b) * dims.T + k0) * dims.ldk + g * dims.H;
        sgemm(kRowMajor, kNoTrans, kTrans, rows, cols, dims.H, dims.scale, qb, dims.ldq, kb,
              dims.ldk, 0.0f, s.data(), cols);
        for (int i = 0; i < rows; ++i) {
          float* si = s.data() + i * cols;
          int width = CausalWidth(q0 + i, k0, cols);
          float row_max = MaskRow(si, width, sb + k0, sb[q0 + i], 0.0f);
          if (row_max == kNegInf) {  // no key of this row allowed yet (another document)
            std::fill(si, si + cols, 0.0f);
            continue;
          }
#pragma omp simd
          for (int j = 0; j < width; ++j) si[j] -= row_max;
          vexp(width, si, si);
          std::fill(si + width, si + cols, 0.0f);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int j = 0; j < width; ++j) sum += si[j];
          float alpha = m[i] == kNegInf ? 0.0f : std::exp(m[i] - row_max);
          l[i] = l[i] * alpha + sum;
          m[i] = row_max;
          if (alpha != 1.0f) {
            float* ai = acc.data() + i * dims.H;
            for (int h = 0; h < dims.H; ++h) ai[h] *= alpha;
          }
        }
        sgemm(kRowMajor, kNoTrans, kNoTrans, rows, dims.H, cols, 1.0f, s.data(), cols, vb,
              dims.ldk, 1.0f, acc.data(), dims.H);
      }
      float* ob = po + (static_cast<int64_t>(b) * dims.T + q0) * dims.ldq + n * dims.H;
      float* lb = pl + (static_cast<int64_t>(b) * dims.N + n) * dims.T + q0;
      for (int i = 0; i < rows; ++i) {
        float inv = 1.0f / l[i];
        for (int h = 0; h < dims.H; ++h) ob[i * dims.ldq + h] = acc[i * dims.H + h] * inv;
        lb[i] = m[i] + std::log(l[i]);
      }
    }
  });
  return ffi::Error::Success();
}

// the forward's inputs, out, lse and d(out) -> dq (dims.B,dims.T,dims.N,dims.H), dk and dv (dims.B,dims.T,dims.K,dims.H)
ffi::Error Backward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, I32 segments, F32 out, F32 lse,
                    F32 d_out, ffi::Result<F32> dq, ffi::Result<F32> dk, ffi::Result<F32> dv) {
  const GemmFn sgemm = f32_gemm.load();
  if (sgemm == nullptr || vexp == nullptr) return ffi::Error::Internal("MKL is not set");
  const Dims dims(q, k);
  const float* pq = q.typed_data();
  const float* pk = k.typed_data();
  const float* pv = v.typed_data();
  const float* po = out.typed_data();
  const float* pl = lse.typed_data();
  const float* pdo = d_out.typed_data();
  const int32_t* seg = segments.typed_data();
  float* pdq = dq->typed_data();
  float* pdk = dk->typed_data();
  float* pdv = dv->typed_data();
  ParallelFor(pool, dims.B * dims.K, [=](int task) {
    int b = task / dims.K, g = task % dims.K;
    std::vector<float> p(kKeyBlock * kKeyTile), dp(kKeyBlock * kKeyTile), delta(dims.T);
    const int32_t* sb = seg + b * dims.T;
    for (int t = 0; t < dims.T; ++t) {
      float* dkr = pdk + (static_cast<int64_t>(b) * dims.T + t) * dims.ldk + g * dims.H;
      float* dvr = pdv + (static_cast<int64_t>(b) * dims.T + t) * dims.ldk + g * dims.H;
      std::fill(dkr, dkr + dims.H, 0.0f);
      std::fill(dvr, dvr + dims.H, 0.0f);
    }
    for (int n = g * dims.group; n < (g + 1) * dims.group; ++n) {
      int64_t head0 = static_cast<int64_t>(b) * dims.T * dims.ldq + n * dims.H;
      const float* lb = pl + (static_cast<int64_t>(b) * dims.N + n) * dims.T;
      for (int t = 0; t < dims.T; ++t) {
        const float* doi = pdo + head0 + t * dims.ldq;
        const float* oi = po + head0 + t * dims.ldq;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int h = 0; h < dims.H; ++h) sum += doi[h] * oi[h];
        delta[t] = sum;
        std::fill(pdq + head0 + t * dims.ldq, pdq + head0 + t * dims.ldq + dims.H, 0.0f);
      }
      // key tiles outer, so the products into d(k) and d(v) contract over many queries
      for (int k0 = 0; k0 < dims.T; k0 += kKeyTile) {
        int cols = std::min(kKeyTile, dims.T - k0);
        int64_t key0 = (static_cast<int64_t>(b) * dims.T + k0) * dims.ldk + g * dims.H;
        const float* kb = pk + key0;
        const float* vb = pv + key0;
        for (int q0 = k0; q0 < dims.T; q0 += kKeyBlock) {
          int rows = std::min(kKeyBlock, dims.T - q0);
          const float* qb = pq + head0 + static_cast<int64_t>(q0) * dims.ldq;
          const float* dob = pdo + head0 + static_cast<int64_t>(q0) * dims.ldq;
          float* dqb = pdq + head0 + static_cast<int64_t>(q0) * dims.ldq;
          sgemm(kRowMajor, kNoTrans, kTrans, rows, cols, dims.H, dims.scale, qb, dims.ldq, kb,
                dims.ldk, 0.0f, p.data(), cols);
          sgemm(kRowMajor, kNoTrans, kTrans, rows, cols, dims.H, 1.0f, dob, dims.ldq, vb,
                dims.ldk, 0.0f, dp.data(), cols);
          for (int i = 0; i < rows; ++i) {
            float* pi = p.data() + i * cols;
            float* di = dp.data() + i * cols;
            int width = CausalWidth(q0 + i, k0, cols);
            MaskRow(pi, width, sb + k0, sb[q0 + i], lb[q0 + i]);
            vexp(width, pi, pi);
            std::fill(pi + width, pi + cols, 0.0f);
            float shift = delta[q0 + i], scale = dims.scale;
#pragma omp simd
            for (int j = 0; j < cols; ++j) di[j] = pi[j] * (di[j] - shift) * scale;
          }
          sgemm(kRowMajor, kTrans, kNoTrans, cols, dims.H, rows, 1.0f, p.data(), cols, dob,
                dims.ldq, 1.0f, pdv + key0, dims.ldk);
          sgemm(kRowMajor, kTrans, kNoTrans, cols, dims.H, rows, 1.0f, dp.data(), cols, qb,
                dims.ldq, 1.0f, pdk + key0, dims.ldk);
          sgemm(kRowMajor, kNoTrans, kNoTrans, rows, dims.H, cols, 1.0f, dp.data(), cols, kb,
                dims.ldk, 1.0f, dqb, dims.ldq);
        }
      }
    }
  });
  return ffi::Error::Success();
}

// The fused head loss's per-chunk softmax (maxlm/loss.py): for each row of float32 logits
// (M, V), its log-sum-exp and target logit, and d(ce + w_z log_z^2)/d logits =
// softmax * (1 + 2 w_z log_z) - onehot(target) written over the logits (zero where the row is
// masked out). One read of each row from memory where XLA's passes (max, sum of exp, gradient)
// read it three times; the row stays in cache between this kernel's passes.
ffi::Error CrossEntropyGrad(ffi::ThreadPool pool, F32Matrix logits, I32 targets, I32 mask,
                            ffi::Result<F32Matrix> grad, ffi::Result<F32> log_z,
                            ffi::Result<F32> target_logit, float z_loss_weight) {
  if (vexp == nullptr) return ffi::Error::Internal("MKL is not set");
  auto dims = logits.dimensions();
  int64_t rows = dims[0];
  int vocab = static_cast<int>(dims[1]);
  const int32_t* pt = targets.typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    if (pt[r] < 0 || pt[r] >= vocab) {
      return ffi::Error::InvalidArgument("maxlm_mkl_cross_entropy_grad: a target id is outside "
                                         "the vocabulary");
    }
  }
  const float* in = logits.typed_data();
  float* out = grad->typed_data();
  if (out != in) std::copy_n(in, logits.element_count(), out);  // not aliased after all
  const int32_t* pm = mask.typed_data();
  float* pz = log_z->typed_data();
  float* pl = target_logit->typed_data();
  constexpr int kRows = 8;  // rows per task
  int tasks = static_cast<int>((rows + kRows - 1) / kRows);
  ParallelFor(pool, tasks, [=](int task) {
    for (int64_t r = task * kRows; r < std::min<int64_t>(rows, (task + 1) * kRows); ++r) {
      float* row = out + r * vocab;
      float row_max = kNegInf;
#pragma omp simd reduction(max : row_max)
      for (int j = 0; j < vocab; ++j) row_max = std::max(row_max, row[j]);
      pl[r] = row[pt[r]];
#pragma omp simd
      for (int j = 0; j < vocab; ++j) row[j] -= row_max;
      vexp(vocab, row, row);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < vocab; ++j) sum += row[j];
      float lz = row_max + std::log(sum);
      pz[r] = lz;
      if (pm[r] == 0) {
        std::fill(row, row + vocab, 0.0f);
        continue;
      }
      float scale = (1.0f + 2.0f * z_loss_weight * lz) / sum;
#pragma omp simd
      for (int j = 0; j < vocab; ++j) row[j] *= scale;
      row[pt[r]] -= 1.0f;
    }
  });
  return ffi::Error::Success();
}

// The GEMM handlers' bindings: the thread pool and operands a, b (then an addend, for GemmAdd),
// WithProduct adding the float32 result and the transpose flags
template <ffi::DataType T>
auto GemmOperands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<Matrix<T>>()
      .template Arg<Matrix<T>>();
}

template <typename Binding>
auto WithProduct(Binding binding) {
  return std::move(binding).template Ret<F32Matrix>()
      .template Attr<bool>("transpose_a")
      .template Attr<bool>("transpose_b");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxlmMklGemm, Gemm<ffi::F32>,
                              WithProduct(GemmOperands<ffi::F32>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxlmMklGemmBf16, Gemm<ffi::BF16>,
                              WithProduct(GemmOperands<ffi::BF16>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxlmMklGemmAdd, GemmAdd<ffi::F32>,
                              WithProduct(GemmOperands<ffi::F32>().Arg<F32Matrix>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxlmMklGemmAddBf16, GemmAdd<ffi::BF16>,
                              WithProduct(GemmOperands<ffi::BF16>().Arg<F32Matrix>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxlmAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<I32>()
                                  .Ret<F32>()
                                  .Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxlmAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<I32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MaxlmCrossEntropyGrad, CrossEntropyGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Matrix>()
                                  .Arg<I32>()
                                  .Arg<I32>()
                                  .Ret<F32Matrix>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<float>("z_loss_weight"));

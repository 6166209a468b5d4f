// frankly's int8 weight-only linear layer for x86 CPUs with AVX2 and FMA.
//
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]  (+ bias[n])
//
// optionally followed by the steering edit on each row of y (project_out, below).
//
// w is int8 [N, K] row-major (one fp32 scale per output row), x is float32 or
// bfloat16 [M, K]; the result is x's dtype. Decode passes have a few rows (one
// per stream), where the cost is reading w and widening it, not the products.
//
// Main path (K a multiple of 16): each row of x is rounded to int16 in blocks of
// kBlock inputs, one fp32 scale per block (max |x| / 32767; finer than bf16 for
// every value above 1/128 of its block's largest),
// and the products run as 16-bit integer multiply-adds (vpmaddwd: 16 weights
// per instruction, one sign extension per 16 weights) summed exactly in int32
// within a block and in fp32 across blocks. Fallback (any K): weights widened
// to fp32, fp32 FMAs.
//
// Up to 8 rows of x (4 on the fp32 path) share each widened weight vector; more
// rows go through in such groups while that stretch of w is still in cache.
// Output rows are split across torch's own OpenMP threads (at::parallel_for).
//
// Built at first use by directions/kernels/__init__.py for the machine it runs
// on (-march=native) and registered as torch.ops.frankly.int8_linear.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/core/CPUAllocator.h>
#include <c10/core/StorageImpl.h>
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "frankly's int8 kernel needs AVX2 and FMA"
#endif

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

inline __m256 widen8(const int8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

// NB output rows (n) by MB input rows (m) at a time; K is split into a vector
// part (multiples of 8) and a scalar tail.
template <int NB, int MB>
inline void tile(const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* scale,
                 const float* bias, float* y, int64_t ldy, int64_t n) {
  __m256 acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm256_setzero_ps();
  const int8_t* wr[NB];
  for (int i = 0; i < NB; ++i) wr[i] = w + (n + i) * K;
  const int64_t kv = K & ~int64_t(7);
  for (int64_t k = 0; k < kv; k += 8) {
    __m256 xv[MB];
    for (int j = 0; j < MB; ++j) xv[j] = _mm256_loadu_ps(x + j * ldx + k);
    for (int i = 0; i < NB; ++i) {
      __m256 wv = widen8(wr[i] + k);
      for (int j = 0; j < MB; ++j) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NB; ++i) {
    const float s = scale[n + i];
    const float b = bias ? bias[n + i] : 0.0f;
    for (int j = 0; j < MB; ++j) {
      float sum = hsum(acc[i][j]);
      for (int64_t k = kv; k < K; ++k) sum += x[j * ldx + k] * float(wr[i][k]);
      y[j * ldy + n + i] = sum * s + b;
    }
  }
}

constexpr int64_t kBlock = 128;  // int16 activation block: 8 vpmaddwd per lane, far from int32 overflow
constexpr int64_t kPrefetch = 512;  // software prefetch distance in weight bytes (measured: 512-2048 alike)

// NB output rows by MB input rows on int16 activations xq [MB][ldq] with scales xs [MB][nblk].
template <int NB, int MB>
inline void itile(const int16_t* xq, int64_t ldq, const float* xs, int64_t nblk, const int8_t* w, int64_t K,
                  const float* scale, const float* bias, float* y, int64_t ldy, int64_t n) {
  __m256 f[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) f[i][j] = _mm256_setzero_ps();
  const int8_t* wr[NB];
  for (int i = 0; i < NB; ++i) wr[i] = w + (n + i) * K;
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t k0 = b * kBlock, k1 = std::min(K, k0 + kBlock);
    __m256i a[NB][MB];
    for (int i = 0; i < NB; ++i)
      for (int j = 0; j < MB; ++j) a[i][j] = _mm256_setzero_si256();
    for (int i = 0; i < NB; ++i) {  // the block kPrefetch bytes ahead (rows are contiguous: past a row's end is the next row)
      _mm_prefetch(reinterpret_cast<const char*>(wr[i] + k0 + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wr[i] + k0 + kPrefetch + 64), _MM_HINT_T0);
    }
    auto step = [&](int64_t k) __attribute__((always_inline)) {
      __m256i xv[MB];
      for (int j = 0; j < MB; ++j) xv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + j * ldq + k));
      for (int i = 0; i < NB; ++i) {
        __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[i] + k)));
        for (int j = 0; j < MB; ++j) a[i][j] = _mm256_add_epi32(a[i][j], _mm256_madd_epi16(wv, xv[j]));
      }
    };
    if (k1 - k0 == kBlock) {  // a whole block: a compile-time trip count, fully unrolled
      // (measured on an AVX2 EPYC, one thread, weights in L2: 30 GB/s against 23 GB/s with the
      // trip count known only at run time)
#pragma GCC unroll 16
      for (int64_t kk = 0; kk < kBlock; kk += 16) step(k0 + kk);
    } else {
      for (int64_t k = k0; k < k1; k += 16) step(k);
    }
    for (int j = 0; j < MB; ++j) {
      const __m256 s = _mm256_set1_ps(xs[j * nblk + b]);
      for (int i = 0; i < NB; ++i) f[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[i][j]), s, f[i][j]);
    }
  }
  for (int i = 0; i < NB; ++i) {
    const float s = scale[n + i];
    const float bb = bias ? bias[n + i] : 0.0f;
    for (int j = 0; j < MB; ++j) y[j * ldy + n + i] = hsum(f[i][j]) * s + bb;
  }
}

template <int MB>
void irows(const int16_t* xq, int64_t ldq, const float* xs, int64_t nblk, const int8_t* w, int64_t K,
           const float* scale, const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  // one weight row at a time: measured on an AVX2 EPYC, two interleaved rows ran at 65% of one row's rate
  constexpr int NB = 1;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) itile<NB, MB>(xq, ldq, xs, nblk, w, K, scale, bias, y, ldy, n);
  for (; n < n1; ++n) itile<1, MB>(xq, ldq, xs, nblk, w, K, scale, bias, y, ldy, n);
}

using IRowsFn = void (*)(const int16_t*, int64_t, const float*, int64_t, const int8_t*, int64_t, const float*,
                         const float*, float*, int64_t, int64_t, int64_t);
constexpr IRowsFn kIRows[9] = {nullptr,   irows<1>, irows<2>, irows<3>, irows<4>,
                               irows<5>,  irows<6>, irows<7>, irows<8>};
constexpr int64_t kMaxIRows = 8;  // measured: one pass of 8 beat two of 4 by 10-15% at 8 rows

// x [M, K] fp32 -> int16 blocks of kBlock with one scale each (round to nearest even).
void quantize_x(const float* x, int64_t M, int64_t K, int16_t* xq, float* xs, int64_t nblk) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nblk; ++b) {
      const float* p = x + m * K + b * kBlock;
      const int64_t len = std::min(kBlock, K - b * kBlock);
      float amax = 0.0f;
      for (int64_t k = 0; k < len; ++k) amax = std::max(amax, std::fabs(p[k]));
      const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
      int16_t* q = xq + m * K + b * kBlock;
      for (int64_t k = 0; k < len; ++k) q[k] = static_cast<int16_t>(std::nearbyint(p[k] * inv));
      xs[m * nblk + b] = amax / 32767.0f;
    }
}

// Rows [n0, n1) of the output for MB input rows.
template <int MB>
void rows(const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* scale, const float* bias,
          float* y, int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int NB = MB == 1 ? 8 : MB == 2 ? 4 : 2;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile<NB, MB>(x, ldx, w, K, scale, bias, y, ldy, n);
  for (; n < n1; ++n) tile<1, MB>(x, ldx, w, K, scale, bias, y, ldy, n);
}

using RowsFn = void (*)(const float*, int64_t, const int8_t*, int64_t, const float*, const float*, float*,
                        int64_t, int64_t, int64_t);
constexpr RowsFn kRows[5] = {nullptr, rows<1>, rows<2>, rows<3>, rows<4>};
constexpr int64_t kMaxRows = 4;  // measured on an AVX2 EPYC: groups of 4 beat one pass of 8

// The steering edit on rows of y (fp32 [M, N]), in place: for each direction d in order,
//   y[m] -= (y[m] . r[d]) * cr[m / T, d]       (T = M / B rows of x per row of cr)
// r is [D, N] (unit directions), cr [B, D, N] (strength x writer weight x r, per batch row):
// what directions.hooks.SteeringHooks' forward hook computes, without a hook call and two ops.
void project_out(float* y, int64_t M, int64_t N, const float* r, const float* cr, int64_t D, int64_t B) {
  const int64_t T = M / B;
  const int64_t nv = N & ~int64_t(7);
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* ym = y + m * N;
      for (int64_t d = 0; d < D; ++d) {
        const float* rd = r + d * N;
        const float* cd = cr + ((m / T) * D + d) * N;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t n = 0; n < nv; n += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(ym + n), _mm256_loadu_ps(rd + n), acc);
        float dot = hsum(acc);
        for (int64_t n = nv; n < N; ++n) dot += ym[n] * rd[n];
        const __m256 dv = _mm256_set1_ps(dot);
        for (int64_t n = 0; n < nv; n += 8)
          _mm256_storeu_ps(ym + n, _mm256_fnmadd_ps(dv, _mm256_loadu_ps(cd + n), _mm256_loadu_ps(ym + n)));
        for (int64_t n = nv; n < N; ++n) ym[n] -= dot * cd[n];
      }
    }
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& r,
                       const std::optional<at::Tensor>& cr) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "frankly::int8_linear runs on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2, "frankly::int8_linear: w must be int8 [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "frankly::int8_linear: x must be float32 or bfloat16");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.size(-1) == K, "frankly::int8_linear: x has ", x.size(-1), " features, w expects ", K);
  TORCH_CHECK(scale.numel() == N, "frankly::int8_linear: one scale per output row");
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  const int64_t M = x.numel() / K;
  at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  at::Tensor wc = w.contiguous();
  at::Tensor sf = scale.to(at::kFloat).contiguous();
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "frankly::int8_linear: one bias per output row");
    bf = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // about 64 KiB of weights per task, whole 8-row groups
  const int64_t grain = std::max<int64_t>(8, ((65536 / std::max<int64_t>(K, 1)) + 7) & ~int64_t(7));
  if (K % 16 == 0) {
    const int64_t nblk = (K + kBlock - 1) / kBlock;
    at::Tensor xq = at::empty({M, K}, xf.options().dtype(at::kShort));
    at::Tensor xs = at::empty({M, nblk}, xf.options());
    int16_t* qp = xq.data_ptr<int16_t>();
    float* qs = xs.data_ptr<float>();
    // rows are rounded independently: split them across the threads too (a prompt has hundreds)
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      quantize_x(xp + m0 * K, m1 - m0, K, qp + m0 * K, qs + m0 * nblk, nblk);
    });
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxIRows) {
        const int64_t mb = std::min<int64_t>(kMaxIRows, M - m0);
        kIRows[mb](qp + m0 * K, K, qs + m0 * nblk, nblk, wp, K, sp, bp, yp + m0 * N, N, n0, n1);
      }
    });
  } else {
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int64_t mb = std::min<int64_t>(kMaxRows, M - m0);
        kRows[mb](xp + m0 * K, K, wp, K, sp, bp, yp + m0 * N, N, n0, n1);
      }
    });
  }
  if (r.has_value() && r->defined()) {
    TORCH_CHECK(cr.has_value() && cr->defined(), "frankly::int8_linear: r needs cr");
    TORCH_CHECK(r->scalar_type() == at::kFloat && cr->scalar_type() == at::kFloat,
                "frankly::int8_linear: r and cr must be float32");
    TORCH_CHECK(r->dim() == 2 && r->size(1) == N, "frankly::int8_linear: r must be [D, ", N, "]");
    const int64_t D = r->size(0);
    TORCH_CHECK(cr->dim() == 3 && cr->size(1) == D && cr->size(2) == N, "frankly::int8_linear: cr must be [B, ", D,
                ", ", N, "]");
    const int64_t B = cr->size(0);
    TORCH_CHECK(B > 0 && M % B == 0, "frankly::int8_linear: ", M, " rows of x do not split into ", B,
                " rows of cr");
    at::Tensor rc = r->contiguous(), crc = cr->contiguous();
    project_out(yp, M, N, rc.data_ptr<float>(), crc.data_ptr<float>(), D, B);
  }
  if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
  return y.reshape(out_sizes);
}

// ---- the small ops around the matmuls of a decoder layer (directions/lean.py) ----
// Each replaces several torch ops (and their Python) with one call; on the 0.5B demo a
// decode step is about 40% such overhead on this CPU. fp32 only; the arithmetic follows
// transformers' Qwen2/Llama modules (same operations, same order, sums in another order).

// out = w * (x * rsqrt(mean(x^2) + eps)) over the last dim, for each row of x [M, D].
void rms_rows(const float* x, const float* w, float* out, int64_t M, int64_t D, float eps) {
  const int64_t dv = D & ~int64_t(7);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * D;
    float* om = out + m * D;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < dv; i += 8) {
      const __m256 v = _mm256_loadu_ps(xm + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (int64_t i = dv; i < D; ++i) ss += xm[i] * xm[i];
    const float r = 1.0f / std::sqrt(ss / float(D) + eps);
    const __m256 rv = _mm256_set1_ps(r);
    for (int64_t i = 0; i < dv; i += 8)
      _mm256_storeu_ps(om + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(xm + i), rv)));
    for (int64_t i = dv; i < D; ++i) om[i] = w[i] * (xm[i] * r);
  }
}

void check_norm_args(const at::Tensor& x, const at::Tensor& w, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "frankly::", name, ": x must be float32 on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == x.size(-1), "frankly::", name,
              ": w must be float32 [", x.size(-1), "]");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_norm_args(x, w, "rms_norm");
  const int64_t D = x.size(-1), M = x.numel() / std::max<int64_t>(D, 1);
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor out = at::empty_like(xc);
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    rms_rows(xc.data_ptr<float>() + m0 * D, wc.data_ptr<float>(), out.data_ptr<float>() + m0 * D, m1 - m0, D, float(eps));
  });
  return out;
}

// (s, rms_norm(s)) for s = x + a: a decoder layer's residual add and the norm after it.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& a, const at::Tensor& w,
                                                double eps) {
  check_norm_args(x, w, "add_rms_norm");
  TORCH_CHECK(a.sizes() == x.sizes() && a.scalar_type() == at::kFloat, "frankly::add_rms_norm: a must match x");
  at::Tensor s = at::add(x, a).contiguous();
  return {s, rms_norm(s, w, eps)};
}

// qkv [B, T, (H + 2 KV) * D] (the stacked q/k/v projections' output) -> q [B, H, T, D] and
// k [B, KV, T, D] with the rotary embedding applied (transformers' rotate_half convention:
//   out = x * cos + rotate_half(x) * sin,  rotate_half(x) = cat(-x[D/2:], x[:D/2])),
// and v [B, KV, T, D]; cos and sin are [B or 1, T, D].
std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope(const at::Tensor& qkv, const at::Tensor& cos,
                                                        const at::Tensor& sin, int64_t H, int64_t KV) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 3,
              "frankly::qkv_rope: qkv must be float32 [B, T, F]");
  const int64_t B = qkv.size(0), T = qkv.size(1);
  TORCH_CHECK(H > 0 && KV > 0 && qkv.size(2) % (H + 2 * KV) == 0, "frankly::qkv_rope: ", qkv.size(2),
              " features do not split into ", H, " + 2 x ", KV, " heads");
  const int64_t D = qkv.size(2) / (H + 2 * KV);
  TORCH_CHECK(D % 2 == 0, "frankly::qkv_rope: odd head size ", D);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 3 &&
                  cos.sizes() == sin.sizes() && (cos.size(0) == B || cos.size(0) == 1) && cos.size(1) == T &&
                  cos.size(2) == D,
              "frankly::qkv_rope: cos and sin must be float32 [", B, " or 1, ", T, ", ", D, "]");
  at::Tensor src = qkv.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor q = at::empty({B, H, T, D}, src.options());
  at::Tensor k = at::empty({B, KV, T, D}, src.options());
  at::Tensor v = at::empty({B, KV, T, D}, src.options());
  const float* sp = src.data_ptr<float>();
  const float* cp = cc.data_ptr<float>();
  const float* snp = sc.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t F = src.size(2), half = D / 2, cb = cc.size(0) == B ? T * D : 0;
  at::parallel_for(0, B * T, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      const float* row = sp + r * F;
      const float* c = cp + b * cb + t * D;
      const float* s = snp + b * cb + t * D;
      auto rope = [&](const float* x, float* o) {
        for (int64_t i = 0; i < half; ++i) {
          o[i] = x[i] * c[i] + (-x[i + half]) * s[i];
          o[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
        }
      };
      for (int64_t h = 0; h < H; ++h) rope(row + h * D, qp + ((b * H + h) * T + t) * D);
      for (int64_t h = 0; h < KV; ++h) {
        rope(row + (H + h) * D, kp + ((b * KV + h) * T + t) * D);
        std::copy_n(row + (H + KV + h) * D, D, vp + ((b * KV + h) * T + t) * D);
      }
    }
  });
  return {q, k, v};
}

// ---- a decode step's attention and the MLP's activation ----

// e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (the Cephes
// expf coefficients), 2^n through the exponent bits. Relative error about 2e-7 on [-87, 88];
// inputs are clamped to that range (below it the result is about 1e-38, not 0).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// 8 keys' or values' features as fp32: from fp32, or from bf16 (the upper half of an fp32).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) {
  const uint32_t b = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// One query row q [D] of head h against L cached positions (row l of k/v at l * ls): softmax over
// the allowed positions (keep[l], all when keep is null) of scale * q.k, times v, into out [D].
// Positions a mask excludes add exactly nothing (not exp(-inf) rounded), and leading ones (left
// padding) do not change the order of the sums either.
template <typename T>
void attend_row(const float* q, const T* k, const T* v, int64_t ls, int64_t L, int64_t D, const bool* keep,
                float scale, float* sc, float* out) {
  // A left-padded row starts at its first allowed position, so its sums run in the same order
  // as without the padding: a row's result does not depend on the batch it is in.
  int64_t l0 = 0;
  while (keep && l0 < L && !keep[l0]) ++l0;
  k += l0 * ls, v += l0 * ls, L -= l0;
  if (keep) keep += l0;
  const int64_t dv = D & ~int64_t(7);
  float mx = -INFINITY;
  for (int64_t l = 0; l < L; ++l) {
    if (keep && !keep[l]) {
      sc[l] = -INFINITY;
      continue;
    }
    const T* kr = k + l * ls;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < dv; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(kr + i), acc);
    float d = hsum(acc);
    for (int64_t i = dv; i < D; ++i) d += q[i] * load1(kr + i);
    sc[l] = d * scale;
    mx = std::max(mx, sc[l]);
  }
  std::fill_n(out, D, 0.0f);
  if (mx == -INFINITY) return;  // nothing to attend to (cannot happen in a decode step: its own position)
  const int64_t lv = L & ~int64_t(7);
  const __m256 vmx = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY);
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t l = 0; l < lv; l += 8) {
    const __m256 x = _mm256_loadu_ps(sc + l);
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(x, vmx)), _mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ));
    _mm256_storeu_ps(sc + l, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (int64_t l = lv; l < L; ++l) {
    sc[l] = sc[l] == -INFINITY ? 0.0f : std::exp(sc[l] - mx);
    sum += sc[l];
  }
  for (int64_t l = 0; l < L; ++l) {
    const float pl = sc[l];
    if (pl == 0.0f) continue;
    const T* vr = v + l * ls;
    const __m256 pv = _mm256_set1_ps(pl);
    for (int64_t i = 0; i < dv; i += 8)
      _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, load8(vr + i), _mm256_loadu_ps(out + i)));
    for (int64_t i = dv; i < D; ++i) out[i] += pl * load1(vr + i);
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < D; ++i) out[i] *= inv;
}

// Attention of a decode step (one query position per row) against the KV cache, with grouped
// heads: q [B, H, 1, D] fp32; k and v [B, KV, L, D] fp32 or bf16, rows of D contiguous (the cache's
// views of larger buffers are fine); keep: optional bool [B or 1, 1, 1, L] (true: attend), as
// transformers' SDPA mask. Returns [B, 1, H, D] fp32, the layout transformers' attention functions
// return. Replaces widening a bf16 cache to fp32 and SDPA (about 115 us a layer at 150 positions on
// an AVX2 EPYC, most of it per-call overhead) with one pass over the cache.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& keep, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 4 && q.size(2) == 1,
              "frankly::decode_attention: q must be float32 [B, H, 1, D]");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "frankly::decode_attention: k and v must be float32 or bfloat16 [B, KV, L, D] alike");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && KV > 0 && H % KV == 0,
              "frankly::decode_attention: k/v [", k.sizes(), "] do not match q [", q.sizes(), "]");
  at::Tensor kc = k.stride(3) == 1 && k.stride(2) == D ? k : k.contiguous();
  at::Tensor vc = v.stride(3) == 1 && v.stride(2) == D && v.strides() == kc.strides() ? v : v.contiguous();
  if (vc.strides() != kc.strides()) kc = kc.contiguous(), vc = vc.contiguous();
  at::Tensor keepc;
  const bool* kp = nullptr;
  int64_t kb = 0;
  if (keep.has_value() && keep->defined()) {
    TORCH_CHECK(keep->scalar_type() == at::kBool && keep->dim() == 4 && keep->size(1) == 1 &&
                    keep->size(2) == 1 && keep->size(3) == L && (keep->size(0) == B || keep->size(0) == 1),
                "frankly::decode_attention: the mask must be bool [", B, " or 1, 1, 1, ", L, "]");
    keepc = keep->contiguous();
    kp = keepc.data_ptr<bool>();
    kb = keep->size(0) == B ? L : 0;
  }
  at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({B, 1, H, D}, qc.options());
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sb = kc.stride(0), sh = kc.stride(1), group = H / KV;
  const float fs = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> sc(static_cast<size_t>(L));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / H, h = r % H, off = b * sb + (h / group) * sh;
      const bool* kr = kp ? kp + b * kb : nullptr;
      if (kc.scalar_type() == at::kFloat)
        attend_row(qp + r * D, kc.data_ptr<float>() + off, vc.data_ptr<float>() + off, D, L, D, kr, fs, sc.data(),
                   op + r * D);
      else
        attend_row(qp + r * D, reinterpret_cast<const uint16_t*>(kc.data_ptr<at::BFloat16>()) + off,
                   reinterpret_cast<const uint16_t*>(vc.data_ptr<at::BFloat16>()) + off, D, L, D, kr, fs,
                   sc.data(), op + r * D);
    }
  });
  return out;
}

// silu(gu[..., :n]) * gu[..., n:] for the stacked gate/up projections' output gu [..., 2n] (fp32):
// the MLP's activation in one pass instead of two slices, silu and a product.
at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.device().is_cpu() && gu.scalar_type() == at::kFloat && gu.dim() >= 1 && gu.size(-1) % 2 == 0,
              "frankly::silu_mul: gu must be float32 [..., 2n]");
  at::Tensor src = gu.contiguous();
  const int64_t n = src.size(-1) / 2, M = src.numel() / (2 * n);
  auto sizes = src.sizes().vec();
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, src.options());
  const float* sp = src.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t nv = n & ~int64_t(7);
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int64_t m = m0; m < m1; ++m) {
      const float* g = sp + m * 2 * n;
      const float* u = g + n;
      float* o = op + m * n;
      for (int64_t i = 0; i < nv; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x))));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
      }
      for (int64_t i = nv; i < n; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// ---- greedy decoding ----

// The index of each row's largest value in x [M, N] fp32 (the first one on ties, NaN never
// chosen unless the row is all NaN, then 0): torch.argmax over a 152k vocabulary took 220 us a row
// on an AVX2 EPYC, this about a tenth of that.
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) > 0,
              "frankly::argmax_rows: x must be float32 [M, N] with N > 0");
  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t M = xc.size(0), N = xc.size(1), ld = xc.stride(0);
  at::Tensor out = at::empty({M}, xc.options().dtype(at::kLong));
  const float* xp = xc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* r = xp + m * ld;
      const int64_t nv = N & ~int64_t(7);
      float best = -INFINITY;
      int64_t arg = -1;
      if (nv) {
        __m256 bv = _mm256_set1_ps(-INFINITY);
        __m256i bi = _mm256_set1_epi32(-1), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i eight = _mm256_set1_epi32(8);
        for (int64_t i = 0; i < nv; i += 8) {
          const __m256 v = _mm256_loadu_ps(r + i);
          const __m256 gt = _mm256_cmp_ps(v, bv, _CMP_GT_OQ);  // strictly greater: each lane keeps its first
          bv = _mm256_blendv_ps(bv, v, gt);
          bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(idx), gt));
          idx = _mm256_add_epi32(idx, eight);
        }
        alignas(32) float vals[8];
        alignas(32) int32_t ids[8];
        _mm256_store_ps(vals, bv);
        _mm256_store_si256(reinterpret_cast<__m256i*>(ids), bi);
        for (int l = 0; l < 8; ++l)
          if (ids[l] >= 0 && (vals[l] > best || (vals[l] == best && ids[l] < arg))) best = vals[l], arg = ids[l];
      }
      for (int64_t i = nv; i < N; ++i)
        if (r[i] > best) best = r[i], arg = i;
      op[m] = arg < 0 ? 0 : arg;
    }
  });
  return out;
}

// ---- weights on transparent huge pages ----
// A decode step streams every weight once; with 4 KiB pages that is a TLB miss every 4 KiB.
// Measured on an AVX2 EPYC (2 threads, a 136 MB matrix): 20 GB/s on 4 KiB pages, 28-29 GB/s
// on 2 MiB pages (Tensor.sum of the same bytes: 28.5 / 31.4). Linux gives huge pages to an
// anonymous mapping advised MADV_HUGEPAGE when transparent_hugepage is "madvise" or "always".
//
// to_huge_pages(t) moves t's whole storage into such a mapping, 2 MiB aligned, and swaps the
// storage's pointer: every tensor and view sharing that storage follows, and the old memory is
// freed at once. Only whole 2 MiB stretches are advised, so the tail costs no extra memory.
// Returns the bytes moved (0 for storages under 2 MiB, or when the mapping fails).

constexpr size_t kHuge = size_t(2) << 20;

struct HugeMapping {
  void* base;
  size_t len;
};

void unmap_huge(void* ctx) {
  auto* m = static_cast<HugeMapping*>(ctx);
  munmap(m->base, m->len);
  delete m;
}

int64_t to_huge_pages(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "frankly::to_huge_pages: CPU tensors only");
  c10::StorageImpl* st = t.storage().unsafeGetStorageImpl();
  const size_t n = st->nbytes();
  if (n < kHuge || st->data() == nullptr) return 0;
  const size_t len = (n + 4095) & ~size_t(4095);
  void* raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return 0;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHuge - 1) & ~uintptr_t(kHuge - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = start + len + kHuge, used_end = aligned + len;
  if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
  void* p = reinterpret_cast<void*>(aligned);
  madvise(p, n & ~(kHuge - 1), MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
  // Copied in 8 MiB pieces. Memory from torch's own CPU allocator belongs to this storage alone, so
  // each copied piece's whole pages go back to the system at once (MADV_DONTNEED) instead of at the
  // end: moving a 136 MB matrix then costs 8 MiB more memory, not 136 MB more.
  const bool owned = st->data_ptr().get_deleter() == c10::GetDefaultCPUAllocator()->raw_deleter();
  const char* src = static_cast<const char*>(st->data());
  constexpr size_t kPiece = size_t(8) << 20;
  for (size_t off = 0; off < n; off += kPiece) {
    const size_t len = std::min(kPiece, n - off);
    std::memcpy(static_cast<char*>(p) + off, src + off, len);
    if (!owned) continue;
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(src + off) + 4095) & ~uintptr_t(4095);
    const uintptr_t hi = reinterpret_cast<uintptr_t>(src + off + len) & ~uintptr_t(4095);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
  }
  at::DataPtr old = st->set_data_ptr(at::DataPtr(p, new HugeMapping{p, len}, &unmap_huge, t.device()));
  return static_cast<int64_t>(n);  // `old` frees the previous memory here
}

}  // namespace

TORCH_LIBRARY(frankly, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias, Tensor? r=None, Tensor? cr=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor a, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("to_huge_pages(Tensor t) -> int");
  m.def("qkv_rope(Tensor qkv, Tensor cos, Tensor sin, int H, int KV) -> (Tensor, Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? keep, float scale) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(frankly, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("qkv_rope", &qkv_rope);
  m.impl("decode_attention", &decode_attention);
  m.impl("silu_mul", &silu_mul);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("to_huge_pages", &to_huge_pages);
}

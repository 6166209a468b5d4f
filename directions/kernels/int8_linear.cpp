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
    for (int64_t k = k0; k < k1; k += 16) {
      __m256i xv[MB];
      for (int j = 0; j < MB; ++j) xv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + j * ldq + k));
      for (int i = 0; i < NB; ++i) {
        __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[i] + k)));
        for (int j = 0; j < MB; ++j) a[i][j] = _mm256_add_epi32(a[i][j], _mm256_madd_epi16(wv, xv[j]));
      }
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
}

TORCH_LIBRARY_IMPL(frankly, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("qkv_rope", &qkv_rope);
  m.impl("to_huge_pages", &to_huge_pages);
}

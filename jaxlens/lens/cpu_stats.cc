// One chunk of the streaming lens statistics for one block of rows, in one cache-resident pass per
// row (the CPU fast path of jaxlens/lens/stream.py; see jaxlens/lens/cpu_kernel.py).
//
// z [rows, C] holds the chunk's logits of rows = tokens * R rows (R rows per token, token-major;
// bias / softcap / temperature already applied, no masked column). Each row folds them into its
// running accumulators exactly as stream.py's XLA path does:
//   m' = max(m, max_v z),  a = e^(m - m'),  e_v = e^(z_v - m'),
//   S' = a S + sum e,  Zc' = a (Zc + (m - m') S) + sum e (z - m'),
//   with a teacher row f of the same token: Ac' = a (Ac + (m_f - m_f') S) + sum e (z_f - m_f'),
//   Bc' = a_f (Bc + (m - m') S_f) + sum (z - m') e_f,
//   cnt' = cnt + #{v : z_v > g} - [the gold's own column, if in this chunk, counted],
//   and the running top-k buffer (value desc, id asc; its ids are below id0) absorbs every
//   z_v > its k-th value, in ascending column order (ties: the lower id stays first).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// e^x for x <= 0 (Cephes' expf polynomial on [-ln2/2, ln2/2], ~1 ulp); branch-free so that the
// compiler vectorises the loops that call it. Below -87.3 the result is 2^-126 * p (~1e-38).
inline float exp_neg(float x) {
  x = x < -87.3f ? -87.3f : x;
  float t = x * 1.44269504088896341f;
  float n = std::nearbyint(t);  // round to nearest (vectorises to one rounding instruction)
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof s);
  return p * s;
}

constexpr int64_t kLanes = 16;

// max of z[0, n): kLanes independent lanes (element-wise, so it vectorises without fast-math)
inline float span_max(const float* z, int64_t n) {
  float acc[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) acc[j] = -INFINITY;
  int64_t v = 0;
  for (; v + kLanes <= n; v += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] = z[v + j] > acc[j] ? z[v + j] : acc[j];
  float mx = -INFINITY;
  for (int64_t j = 0; j < kLanes; ++j) mx = acc[j] > mx ? acc[j] : mx;
  for (; v < n; ++v) mx = z[v] > mx ? z[v] : mx;
  return mx;
}

// inserts every z_v > the buffer's k-th value (v ascending; masked NEG columns never enter);
// spans of 64 columns whose maximum does not beat the k-th value are skipped after one
// vectorised max
inline void topk_absorb(const float* z, int64_t C, int32_t id0, float* tv, int32_t* ti, int64_t k) {
  constexpr int64_t kSpan = 64;
  float theta = tv[k - 1];
  for (int64_t s = 0; s < C; s += kSpan) {
    const int64_t e = s + kSpan < C ? s + kSpan : C;
    if (!(span_max(z + s, e - s) > theta)) continue;
    for (int64_t v = s; v < e; ++v) {
      float x = z[v];
      if (!(x > theta) || x < -0.5e30f) continue;
      int64_t p = k - 1;  // new position: after every buffer entry with value >= x
      while (p > 0 && tv[p - 1] < x) {
        tv[p] = tv[p - 1];
        ti[p] = ti[p - 1];
        --p;
      }
      tv[p] = x;
      ti[p] = id0 + static_cast<int32_t>(v);
      theta = tv[k - 1];
    }
  }
}

ffi::Error StatsImpl(ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> S,
                     ffi::Buffer<ffi::F32> Zc, ffi::Buffer<ffi::F32> Ac, ffi::Buffer<ffi::F32> Bc,
                     ffi::Buffer<ffi::S32> cnt, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::S32> selfcol,
                     ffi::Buffer<ffi::F32> tv, ffi::Buffer<ffi::S32> ti, ffi::Buffer<ffi::S32> id0,
                     int64_t R, int64_t teacher_row, int64_t has_gold, int64_t k,
                     ffi::ResultBuffer<ffi::F32> m_o, ffi::ResultBuffer<ffi::F32> S_o,
                     ffi::ResultBuffer<ffi::F32> Zc_o, ffi::ResultBuffer<ffi::F32> Ac_o,
                     ffi::ResultBuffer<ffi::F32> Bc_o, ffi::ResultBuffer<ffi::S32> cnt_o,
                     ffi::ResultBuffer<ffi::F32> tv_o, ffi::ResultBuffer<ffi::S32> ti_o) {
  auto dims = z.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("z must be [rows, C]");
  const int64_t rows = dims[0], C = dims[1];
  if (R < 1 || rows % R) return ffi::Error::InvalidArgument("rows must be a multiple of R");
  const int64_t kb = tv.dimensions().back();  // buffer width (1 when k == 0)
  const float* zp = z.typed_data();
  const int32_t base_id = id0.typed_data()[0];
  const bool teacher = teacher_row >= 0;
  std::vector<float> mnew(rows), ef(teacher ? C : 0), zcf(teacher ? C : 0);
  std::memcpy(tv_o->typed_data(), tv.typed_data(), sizeof(float) * rows * kb);
  std::memcpy(ti_o->typed_data(), ti.typed_data(), sizeof(int32_t) * rows * kb);
  for (int64_t t0 = 0; t0 < rows; t0 += R) {
    for (int64_t r = t0; r < t0 + R; ++r) {
      float mo = m.typed_data()[r], cm = span_max(zp + r * C, C);
      mnew[r] = cm > mo ? cm : mo;
    }
    const int64_t f = t0 + teacher_row;
    if (teacher) {
      const float* zf = zp + f * C;
      const float mf = mnew[f];
      for (int64_t v = 0; v < C; ++v) {
        zcf[v] = zf[v] - mf;
        ef[v] = exp_neg(zcf[v]);
      }
    }
    for (int64_t r = t0; r < t0 + R; ++r) {
      const float* zr = zp + r * C;
      const float mn = mnew[r], gr = g.typed_data()[r];
      float se = 0.f, sz = 0.f, sa = 0.f, sb = 0.f, gt = 0.f;
      for (int64_t v = 0; v < C; ++v) {  // (-O3 unswitches the teacher test out of the loop)
        float zc = zr[v] - mn, e = exp_neg(zc);
        se += e;
        sz += e * zc;
        if (teacher) {
          sa += e * zcf[v];
          sb += zc * ef[v];
        }
      }
      if (has_gold) {
        for (int64_t v = 0; v < C; ++v) gt += zr[v] > gr ? 1.f : 0.f;
        int32_t sc = selfcol.typed_data()[r];
        if (sc >= 0 && sc < C && zr[sc] > gr) gt -= 1.f;
      }
      const float mo = m.typed_data()[r], So = S.typed_data()[r], dm = mo - mn;
      const float a = std::exp(dm);
      m_o->typed_data()[r] = mn;
      S_o->typed_data()[r] = a * So + se;
      Zc_o->typed_data()[r] = a * (Zc.typed_data()[r] + dm * So) + sz;
      if (teacher) {
        const float dmf = m.typed_data()[f] - mnew[f];
        const float af = std::exp(dmf), Sf = S.typed_data()[f];
        Ac_o->typed_data()[r] = a * (Ac.typed_data()[r] + dmf * So) + sa;
        Bc_o->typed_data()[r] = af * (Bc.typed_data()[r] + dm * Sf) + sb;
      } else {
        Ac_o->typed_data()[r] = Ac.typed_data()[r];
        Bc_o->typed_data()[r] = Bc.typed_data()[r];
      }
      cnt_o->typed_data()[r] = cnt.typed_data()[r] + static_cast<int32_t>(gt);
      if (k > 0) topk_absorb(zr, C, base_id, tv_o->typed_data() + r * kb, ti_o->typed_data() + r * kb, k);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlensChunkStats, StatsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // z
                                  .Arg<ffi::Buffer<ffi::F32>>()   // m
                                  .Arg<ffi::Buffer<ffi::F32>>()   // S
                                  .Arg<ffi::Buffer<ffi::F32>>()   // Zc
                                  .Arg<ffi::Buffer<ffi::F32>>()   // Ac
                                  .Arg<ffi::Buffer<ffi::F32>>()   // Bc
                                  .Arg<ffi::Buffer<ffi::S32>>()   // cnt
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g
                                  .Arg<ffi::Buffer<ffi::S32>>()   // selfcol
                                  .Arg<ffi::Buffer<ffi::F32>>()   // tv
                                  .Arg<ffi::Buffer<ffi::S32>>()   // ti
                                  .Arg<ffi::Buffer<ffi::S32>>()   // id0
                                  .Attr<int64_t>("R")
                                  .Attr<int64_t>("teacher_row")
                                  .Attr<int64_t>("has_gold")
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

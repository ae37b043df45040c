// bnviz::probe -- the manual-vs-native BatchNorm check of one layer in one or two reads.
//
// Why this exists: on a CPU the networks are memory-bound, so every full pass over an
// activation costs about as much as BatchNorm itself. Eager PyTorch needs six passes for the
// check (a sum, a centring write, a norm, a fused difference write, a max and a min). This
// kernel reads the input x and the native output y of a float32, contiguous (N, C, L) layer:
//
//   eval (the scale weight / sqrt(running_var + eps) and running_mean given):
//       one pass per row x[n, c, :] and y[n, c, :]: the sums for the batch statistics and the
//       difference y - (x - running_mean) * scale, together;
//   train: per channel, the sums over its rows, then (the channel now in cache) the
//       difference y - (x - batch_mean) * scale with the scale from this batch's variance.
//
// The work runs in PyTorch's own thread pool (at::parallel_for over channels), so it does not
// compete with a second threading runtime. The formula is bnviz/manual_bn.py's: nothing here
// calls BatchNorm code. The Python side (bnviz/probe_kernel.py) builds this file with the
// system compiler. Two operators: `probe` returns one layer's raw sums and extremes (a
// manual_bn.Probe); `probe_into`, what inspect's CPU forward calls, also finishes the
// layer (statistics, differences, the running-stat update check: manual_bn.summarise's
// arithmetic) into network-wide blocks.
//
// Numerics: sums are taken about the mean of the channel's first row (close to the channel
// mean, so s2/count - (s1/count)^2 does not cancel), in float lanes flushed into double
// every BLOCK values; the difference is computed in float32, as the eager path does. A NaN
// anywhere in a channel's difference makes both of its extremes NaN (never a small number).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One build runs everywhere: an AVX2+FMA copy of each loop and a baseline copy, picked at
// load time by the CPU.
#define BNVIZ_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define BNVIZ_CLONES
#endif

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline v8f splat(float a) { return v8f{a, a, a, a, a, a, a, a}; }

constexpr int64_t BLOCK = 1024;  // values summed in float lanes before flushing into double

struct Sums {
  double s1;
  double s2;
  void add(float x, float c0) {  // one value of a row's scalar tail, in double
    const double d = double(x) - double(c0);
    s1 += d;
    s2 += d * d;
  }
};
struct Extremes { float hi; float lo; int bad; };

// Sum of one row.
BNVIZ_CLONES
double row_sum(const float* __restrict x, int64_t len) {
  double s = 0.0;
  int64_t i = 0;
  while (i + 16 <= len) {
    v8f a = splat(0.f), b = splat(0.f);
    const int64_t stop = std::min<int64_t>(len, i + BLOCK);
    for (; i + 16 <= stop; i += 16) {
      a += load8(x + i);
      b += load8(x + i + 8);
    }
    for (int j = 0; j < 8; ++j) s += double(a[j]) + double(b[j]);
  }
  for (; i < len; ++i) s += x[i];
  return s;
}

// The channel functions below walk the N rows of one channel (row r at x + r * stride),
// keeping their vector accumulators across rows: the 7x7 layers have rows of 49 values, where
// a reduction per row would cost more than the row itself. Float partial sums are flushed
// into double after at most 2 * BLOCK values.

struct Lanes {  // float partial sums of (x - c0) and (x - c0)^2, two registers each
  v8f a1 = splat(0.f), b1 = splat(0.f), a2 = splat(0.f), b2 = splat(0.f);
  int64_t pending = 0;
  void add(v8f d, v8f e) {  // 16 centred values
    a1 += d; b1 += e;
    a2 += d * d; b2 += e * e;
  }
  void flush(Sums& r) {
    for (int j = 0; j < 8; ++j) {
      r.s1 += double(a1[j]) + double(b1[j]);
      r.s2 += double(a2[j]) + double(b2[j]);
    }
    a1 = b1 = a2 = b2 = splat(0.f);
    pending = 0;
  }
};

struct Peaks {  // running extremes of the difference, two registers each
  v8f hi0 = splat(-HUGE_VALF), hi1 = splat(-HUGE_VALF);
  v8f lo0 = splat(HUGE_VALF), lo1 = splat(HUGE_VALF);
  v8i bad = v8i{0, 0, 0, 0, 0, 0, 0, 0};
  void add(v8f f, v8f g) {  // 16 differences
    hi0 = f > hi0 ? f : hi0; lo0 = f < lo0 ? f : lo0;
    hi1 = g > hi1 ? g : hi1; lo1 = g < lo1 ? g : lo1;
    bad |= (f != f) | (g != g);
  }
  void merge(Extremes& r) const {
    for (int j = 0; j < 8; ++j) {
      r.hi = std::max(r.hi, std::max(hi0[j], hi1[j]));
      r.lo = std::min(r.lo, std::min(lo0[j], lo1[j]));
      r.bad |= bad[j];
    }
  }
};

inline void scalar_extreme(Extremes& r, float d) {
  r.hi = d > r.hi ? d : r.hi;
  r.lo = d < r.lo ? d : r.lo;
  r.bad |= (d != d);
}

// One row in steps of 16 values, `step(i)` taking values i..i+15, flushing the float lanes
// into `sums` after every BLOCK values (counted across rows); returns where the row's scalar
// tail starts. Always inlined, so `step` is compiled for the caller's target clone.
template <class Step>
__attribute__((always_inline)) inline int64_t blocked_row(int64_t len, Lanes& L, Sums& sums,
                                                          Step step) {
  int64_t i = 0;
  while (i + 16 <= len) {
    const int64_t stop = std::min<int64_t>(len, i + BLOCK);
    const int64_t start = i;
    for (; i + 16 <= stop; i += 16) step(i);
    L.pending += i - start;
    if (L.pending >= BLOCK) L.flush(sums);
  }
  return i;
}

// Sum and sum of squares of (x - c0) over a channel.
BNVIZ_CLONES
Sums channel_sums(const float* __restrict x, int64_t rows, int64_t stride, int64_t len,
                  float c0) {
  Sums r{0.0, 0.0};
  Lanes L;
  const v8f c = splat(c0);
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x + row * stride;
    int64_t i = blocked_row(len, L, r, [&](int64_t j) __attribute__((always_inline)) {
      L.add(load8(xr + j) - c, load8(xr + j + 8) - c);
    });
    for (; i < len; ++i) r.add(xr[i], c0);
  }
  L.flush(r);
  return r;
}

// Extremes of y - (x - m) * s over a channel.
BNVIZ_CLONES
Extremes channel_diff(const float* __restrict x, const float* __restrict y, int64_t rows,
                      int64_t stride, int64_t len, float m, float s) {
  const v8f mv = splat(m), sv = splat(s);
  Peaks P;
  Extremes r{-HUGE_VALF, HUGE_VALF, 0};
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x + row * stride;
    const float* yr = y + row * stride;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      P.add(load8(yr + i) - (load8(xr + i) - mv) * sv,
            load8(yr + i + 8) - (load8(xr + i + 8) - mv) * sv);
    }
    for (; i < len; ++i) scalar_extreme(r, yr[i] - (xr[i] - m) * s);
  }
  P.merge(r);
  return r;
}

// Eval mode: sums of (x - c0) and extremes of y - (x - m) * s in the same read.
BNVIZ_CLONES
void channel_fused(const float* __restrict x, const float* __restrict y, int64_t rows,
                   int64_t stride, int64_t len, float c0, float m, float s, Sums& sums,
                   Extremes& ext) {
  const v8f c = splat(c0), mv = splat(m), sv = splat(s);
  Lanes L;
  Peaks P;
  for (int64_t row = 0; row < rows; ++row) {
    const float* xr = x + row * stride;
    const float* yr = y + row * stride;
    int64_t i = blocked_row(len, L, sums, [&](int64_t j) __attribute__((always_inline)) {
      const v8f xa = load8(xr + j), xb = load8(xr + j + 8);
      L.add(xa - c, xb - c);
      P.add(load8(yr + j) - (xa - mv) * sv, load8(yr + j + 8) - (xb - mv) * sv);
    });
    for (; i < len; ++i) {
      sums.add(xr[i], c0);
      scalar_extreme(ext, yr[i] - (xr[i] - m) * s);
    }
  }
  L.flush(sums);
  P.merge(ext);
}

const float* optional_data(const c10::optional<at::Tensor>& t, int64_t c, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == c &&
                  t->device().is_cpu(),
              "bnviz::probe: ", what, " must be a contiguous float32 CPU vector of ", c,
              " values");
  return t->data_ptr<float>();
}

// One channel's raw results (manual_bn.Probe's fields for that channel).
struct Channel {
  double total;  // sum of x
  double sq;     // sum of (x - centre)^2
  double hi;     // max of y - (x - norm_mean) * scale
  double lo;     // min of the same
  float centre;  // mean of the channel's first row
  float scale;   // weight / sqrt(var + eps) the manual output used
  float norm_mean;  // the mean it subtracted (batch or running)
};

struct Layer {
  const float* xp;
  const float* yp;
  const float* wp;  // weight or nullptr
  const float* mp;  // running mean (eval) or nullptr
  const float* sp;  // eval scale or nullptr
  int64_t n, c, len, count;
  double eps;
};

Layer check_layer_args(const at::Tensor& x, const at::Tensor& y,
                       const c10::optional<at::Tensor>& weight, double eps,
                       const c10::optional<at::Tensor>& running_mean,
                       const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "bnviz::probe: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat,
              "bnviz::probe: float32 only");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "bnviz::probe: contiguous tensors only");
  TORCH_CHECK(x.dim() >= 2 && x.sizes() == y.sizes(), "bnviz::probe: x and y must share an ",
              "(N, C, ...) shape");
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(n > 0 && x.numel() > 0, "bnviz::probe: empty input");
  Layer L;
  L.xp = x.data_ptr<float>();
  L.yp = y.data_ptr<float>();
  L.wp = optional_data(weight, c, "weight");
  L.mp = optional_data(running_mean, c, "running_mean");
  L.sp = optional_data(scale, c, "scale");
  TORCH_CHECK((L.mp == nullptr) == (L.sp == nullptr),
              "bnviz::probe: running_mean and scale come together (eval mode) or not at all");
  L.n = n;
  L.c = c;
  L.len = x.numel() / (n * c);
  L.count = n * L.len;
  L.eps = eps;
  return L;
}

Channel check_channel(const Layer& L, int64_t ch) {
  const int64_t len = L.len, count = L.count;
  const float* xc = L.xp + ch * len;
  const float* yc = L.yp + ch * len;
  const float c0 = static_cast<float>(row_sum(xc, len) / double(len));
  Sums sums{0.0, 0.0};
  Extremes ext{-HUGE_VALF, HUGE_VALF, 0};
  float sc, m;
  if (L.mp != nullptr) {
    sc = L.sp[ch];
    m = L.mp[ch];
    channel_fused(xc, yc, L.n, L.c * len, len, c0, m, sc, sums, ext);
  } else {
    sums = channel_sums(xc, L.n, L.c * len, len, c0);
    const double d = sums.s1 / double(count);
    const double var = std::max(0.0, sums.s2 / double(count) - d * d);
    sc = static_cast<float>(1.0 / std::sqrt(var + L.eps) * (L.wp ? double(L.wp[ch]) : 1.0));
    m = static_cast<float>(double(c0) + d);
    ext = channel_diff(xc, yc, L.n, L.c * len, len, m, sc);
  }
  if (ext.bad) ext.hi = ext.lo = NAN;
  return {double(c0) * double(count) + sums.s1, sums.s2, ext.hi, ext.lo, c0, sc, m};
}

// At least ~32k values per task, so small layers are not split into tiny pieces.
int64_t grain_of(const Layer& L) { return std::max<int64_t>(1, 32768 / L.count); }

// One layer on its own: (f64 (4, C): total, sq, hi, lo; f32 (3, C): centre, scale,
// norm_mean), the fields of manual_bn.Probe, which summarise() turns into statistics.
std::tuple<at::Tensor, at::Tensor> probe(const at::Tensor& x, const at::Tensor& y,
                                         const c10::optional<at::Tensor>& weight, double eps,
                                         const c10::optional<at::Tensor>& running_mean,
                                         const c10::optional<at::Tensor>& scale) {
  const Layer L = check_layer_args(x, y, weight, eps, running_mean, scale);
  const int64_t c = L.c;
  at::Tensor f64 = at::empty({4, c}, x.options().dtype(at::kDouble));
  at::Tensor f32 = at::empty({3, c}, x.options());
  double* o64 = f64.data_ptr<double>();
  float* o32 = f32.data_ptr<float>();
  at::parallel_for(0, c, grain_of(L), [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const Channel r = check_channel(L, ch);
      o64[ch] = r.total;
      o64[c + ch] = r.sq;
      o64[2 * c + ch] = r.hi;
      o64[3 * c + ch] = r.lo;
      o32[ch] = r.centre;
      o32[c + ch] = r.scale;
      o32[2 * c + ch] = r.norm_mean;
    }
  });
  return {f64, f32};
}

// NaN-propagating max, as torch.maximum / scatter_reduce("amax") do.
inline double nan_max(double a, double b) { return (std::isnan(a) || a > b) ? a : b; }

// One layer of an inspection, finished: the arithmetic of manual_bn._summarise_group
// (same formula, same order, in double) done per channel right here, so the Python side
// has nothing left to compute. Writes columns [offset, offset + C) of `out` (float32 rows:
// batch mean, biased variance, unbiased variance, max |manual - native|, and for a layer
// that updated its running statistics the manual new running mean and variance) and column
// `layer` of `maxima` (float64 rows: the layer's largest difference, its largest E[y^2], and
// the largest |manual - native| of its running-stat update).
//
// The update check is bnviz/inspection/layer_reports.py's _manual_updates
// (manual_bn.manual_running_update):
//   new = (1 - factor) * before + factor * batch    (batch mean, unbiased variance)
// from the statistics as the report holds them (float32), in double, against the buffers
// BatchNorm just wrote (`after_mean`, `after_var`). `before_mean`/`before_var` are the
// buffers as they were before the forward.
void probe_into(const at::Tensor& x, const at::Tensor& y, at::Tensor& out, at::Tensor& maxima,
                int64_t offset, int64_t layer, const c10::optional<at::Tensor>& weight,
                const c10::optional<at::Tensor>& bias, double eps,
                const c10::optional<at::Tensor>& running_mean,
                const c10::optional<at::Tensor>& scale,
                const c10::optional<at::Tensor>& before_mean,
                const c10::optional<at::Tensor>& before_var,
                const c10::optional<at::Tensor>& after_mean,
                const c10::optional<at::Tensor>& after_var, double factor) {
  const Layer L = check_layer_args(x, y, weight, eps, running_mean, scale);
  const int64_t c = L.c, count = L.count;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) >= 4 &&
                  out.is_contiguous() && out.device().is_cpu(),
              "bnviz::probe_into: out must be a contiguous float32 CPU block (4 or 6, width)");
  TORCH_CHECK(maxima.scalar_type() == at::kDouble && maxima.dim() == 2 &&
                  maxima.size(0) == 3 && maxima.is_contiguous() && maxima.device().is_cpu(),
              "bnviz::probe_into: maxima must be a contiguous float64 CPU block (3, layers)");
  const int64_t width = out.size(1), layers = maxima.size(1);
  TORCH_CHECK(offset >= 0 && offset + c <= width, "bnviz::probe_into: columns ", offset, "..",
              offset + c, " do not fit a block of ", width);
  TORCH_CHECK(layer >= 0 && layer < layers, "bnviz::probe_into: layer ", layer,
              " out of range for ", layers);
  const float* bp = optional_data(bias, c, "bias");
  const float* b_m = optional_data(before_mean, c, "before_mean");
  const float* b_v = optional_data(before_var, c, "before_var");
  const float* a_m = optional_data(after_mean, c, "after_mean");
  const float* a_v = optional_data(after_var, c, "after_var");
  const bool update = b_m != nullptr;
  TORCH_CHECK(update == (b_v != nullptr) && update == (a_m != nullptr) &&
                  update == (a_v != nullptr),
              "bnviz::probe_into: the running-stat update needs all four of before_mean, "
              "before_var, after_mean and after_var");
  TORCH_CHECK(!update || out.size(0) >= 6,
              "bnviz::probe_into: the running-stat update needs a block of 6 rows");
  TORCH_CHECK(!update || count > 1,
              "bnviz::probe_into: no unbiased variance (one value per channel) to update with");
  float* o = out.data_ptr<float>() + offset;
  double* mx = maxima.data_ptr<double>();
  std::vector<double> diff(c), ysq(c), upd(update ? c : 0);
  const double n = double(count);
  at::parallel_for(0, c, grain_of(L), [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const Channel r = check_channel(L, ch);
      const double centre = r.centre, sc = r.scale, nm = r.norm_mean;
      const double beta = bp ? double(bp[ch]) : 0.0;
      const double mean = r.total / n;
      const double var = std::max(r.sq / n - (mean - centre) * (mean - centre), 0.0);
      const double unbiased = var * n / (n - 1.0);
      const double shift = beta + (nm - nm) * sc;  // differences are about norm_mean
      diff[ch] = nan_max(r.hi - shift, shift - r.lo);
      const double d = mean - nm;
      ysq[ch] = std::max(sc * sc * (var + d * d) + 2.0 * sc * beta * d + beta * beta, 0.0);
      const float mean32 = static_cast<float>(mean), unbiased32 = static_cast<float>(unbiased);
      o[ch] = mean32;
      o[width + ch] = static_cast<float>(var);
      o[2 * width + ch] = unbiased32;
      o[3 * width + ch] = static_cast<float>(diff[ch]);
      if (update) {
        const double new_mean = (1.0 - factor) * double(b_m[ch]) + factor * double(mean32);
        const double new_var = (1.0 - factor) * double(b_v[ch]) + factor * double(unbiased32);
        upd[ch] = nan_max(std::abs(new_mean - double(a_m[ch])),
                          std::abs(new_var - double(a_v[ch])));
        o[4 * width + ch] = static_cast<float>(new_mean);
        o[5 * width + ch] = static_cast<float>(new_var);
      }
    }
  });
  double dmax = 0.0, ymax = 0.0, umax = 0.0;  // like zero-initialised scatter_reduce amax
  for (int64_t ch = 0; ch < c; ++ch) {
    dmax = nan_max(diff[ch], dmax);
    ymax = nan_max(ysq[ch], ymax);
    if (update) umax = nan_max(upd[ch], umax);
  }
  mx[layer] = dmax;
  mx[layers + layer] = ymax;
  mx[2 * layers + layer] = update ? umax : NAN;
}

}  // namespace

TORCH_LIBRARY(bnviz, m) {
  m.def("probe(Tensor x, Tensor y, Tensor? weight, float eps, Tensor? running_mean, "
        "Tensor? scale) -> (Tensor, Tensor)");
  m.def("probe_into(Tensor x, Tensor y, Tensor(a!) out, Tensor(b!) maxima, int offset, "
        "int layer, Tensor? weight, Tensor? bias, float eps, Tensor? running_mean, "
        "Tensor? scale, Tensor? before_mean, Tensor? before_var, Tensor? after_mean, "
        "Tensor? after_var, float factor) -> ()");
}

TORCH_LIBRARY_IMPL(bnviz, CPU, m) {
  m.impl("probe", probe);
  m.impl("probe_into", probe_into);
}

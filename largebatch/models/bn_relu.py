"""Batch norm, the residual addition where a block has one, and the ReLU after them as
one CPU kernel pair, for bf16 activations in channels_last (what ResNet-50 trains in on
a CPU with bf16).

Why: on a CPU these passes are bound by memory, not arithmetic. Separately, BN reads its
input twice and writes it once, then the addition and the ReLU each read and write the
result again; backward, the ReLU's gradient is one more pass before BN's two, and it
reads the output. Fused, the forward makes BN's passes only (reading the residual in the
second, and keeping the ReLU's mask as bits where there is a residual), and the backward
makes BN's two, finding the mask from the input or those bits, never reading the output
(docs/BENCHMARKS.md, "What stands between ResNet-50's step and the matrix units").

The kernels are compiled at their first use (torch's C++ extension loader, a C++
compiler and ninja) and cached. Statistics are per group of samples, as GroupBatchNorm2d
computes them: in channels_last a group's samples are one contiguous block of rows.
Where the kernels do not apply (a GPU, fp32, the contiguous layout, channels not a
multiple of 32, evaluation, torch.compile), or cannot be built, BN and ReLU run as
before.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import torch

from .. import dist

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <immintrin.h>
using namespace at::vec;
using bf = at::BFloat16;
using fV = Vectorized<float>;
using bV = Vectorized<bf>;
constexpr int64_t kBlock = 64;  // rows summed in float before they join a thread's sums
constexpr int64_t kHalf = 16;   // floats per vector: a bf16 vector of 32 channels is two of them

// The normalisation of one group as an affine map per channel, in float, computed the
// same way forward and backward so that both see the same pre-activations.
static void affine(const float* w, const float* b, const float* mean, const float* invstd, int64_t C,
                   float* scale, float* shift) {
  for (int64_t c = 0; c < C; ++c) { scale[c] = w[c] * invstd[c]; shift[c] = b[c] - mean[c] * scale[c]; }
}

// The gradient through the ReLU for 32 channels of a row: where the output was positive,
// read from the forward's bit mask (one bit per value), or, without a residual, where
// the pre-activation x * scale + shift > 0, recomputed: neither reads the output.
static inline void relu_mask(fV& g0, fV& g1, const fV& x0, const fV& x1, const uint32_t* bits, const float* A,
                             const float* B) {
  if (bits) {
    g0 = _mm512_maskz_mov_ps(__mmask16(*bits & 0xffff), g0);
    g1 = _mm512_maskz_mov_ps(__mmask16(*bits >> 16), g1);
    return;
  }
  fV m0 = fmadd(x0, fV::loadu(A), fV::loadu(B)), m1 = fmadd(x1, fV::loadu(A + kHalf), fV::loadu(B + kHalf));
  g0 = fV::blendv(fV(0), g0, m0 > fV(0));
  g1 = fV::blendv(fV(0), g1, m1 > fV(0));
}

// Where a float vector is positive, as 16 bits.
static inline uint32_t positive(const fV& v) { return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ); }

// Per-channel sums, in double, over `rows` rows of C channels: of x and x * x (gy null), or
// of the gradient g through the ReLU and of g * x.
static void channel_sums(const bf* x, const bf* gy, const uint32_t* bits, const float* A, const float* B, int64_t rows,
                         int64_t C, double* s1, double* s2) {
  const int nt = at::get_num_threads();
  std::vector<float> acc(size_t(nt) * 2 * C, 0.f);
  at::parallel_for(0, rows, kBlock, [&](int64_t begin, int64_t end) {
    float* a1 = acc.data() + size_t(at::get_thread_num()) * 2 * C;
    float* a2 = a1 + C;
    for (int64_t r0 = begin; r0 < end; r0 += kBlock) {
      const int64_t r1 = std::min(end, r0 + kBlock);
      for (int64_t c = 0; c < C; c += bV::size()) {
        fV p0(0), p1(0), q0(0), q1(0);
        for (int64_t r = r0; r < r1; ++r) {
          auto [v0, v1] = convert_to_float<bf>(bV::loadu(x + r * C + c));
          fV u0 = v0, u1 = v1;  // what is summed: x, or the gradient
          if (gy) {
            auto [g0, g1] = convert_to_float<bf>(bV::loadu(gy + r * C + c));
            relu_mask(g0, g1, v0, v1, bits ? bits + (r * C + c) / 32 : nullptr, A + c, B + c);
            u0 = g0; u1 = g1;
          }
          p0 += u0; p1 += u1; q0 = fmadd(u0, v0, q0); q1 = fmadd(u1, v1, q1);
        }
        (fV::loadu(a1 + c) + p0).store(a1 + c); (fV::loadu(a1 + c + kHalf) + p1).store(a1 + c + kHalf);
        (fV::loadu(a2 + c) + q0).store(a2 + c); (fV::loadu(a2 + c + kHalf) + q1).store(a2 + c + kHalf);
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) { s1[c] = 0; s2[c] = 0; }
  for (int t = 0; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) { s1[c] += acc[size_t(t) * 2 * C + c]; s2[c] += acc[size_t(t) * 2 * C + C + c]; }
}

// x: (N, C, H, W) bf16 channels_last in `groups` groups of samples; weight, bias: (C) fp32;
// residual: none, or a tensor like x added before the ReLU.
// Returns y = relu(bn(x) [+ residual]), per group the mean, 1 / std and unbiased variance,
// and, with a residual, where y > 0 as bits (what the backward needs of y).
std::vector<at::Tensor> forward(at::Tensor x, at::Tensor weight, at::Tensor bias, c10::optional<at::Tensor> residual,
                                int64_t groups, double eps) {
  const int64_t C = x.size(1), rows = x.numel() / C / groups;
  at::Tensor res = residual.has_value() ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  auto opts = weight.options().dtype(at::kFloat);
  auto mean = at::empty({groups, C}, opts), invstd = at::empty({groups, C}, opts), var = at::empty({groups, C}, opts);
  auto y = at::empty_like(x);
  auto mask = at::empty({res.defined() ? x.numel() / 32 : 0}, x.options().dtype(at::kInt));
  std::vector<double> s1(C), s2(C);
  std::vector<float> scale(C), shift(C);
  float *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>(), *vp = var.data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t off = g * rows * C;
    const bf* xg = x.data_ptr<bf>() + off;
    const bf* rg = res.defined() ? res.data_ptr<bf>() + off : nullptr;
    bf* yg = y.data_ptr<bf>() + off;
    uint32_t* mg = res.defined() ? reinterpret_cast<uint32_t*>(mask.data_ptr<int32_t>()) + off / 32 : nullptr;
    channel_sums(xg, nullptr, nullptr, nullptr, nullptr, rows, C, s1.data(), s2.data());
    for (int64_t c = 0; c < C; ++c) {
      double m = s1[c] / rows, v = std::max(s2[c] / rows - m * m, 0.0);
      mp[g * C + c] = m; ip[g * C + c] = 1.0 / std::sqrt(v + eps); vp[g * C + c] = rows > 1 ? v * rows / (rows - 1) : v;
    }
    affine(weight.data_ptr<float>(), bias.data_ptr<float>(), mp + g * C, ip + g * C, C, scale.data(), shift.data());
    const float *A = scale.data(), *B = shift.data();
    at::parallel_for(0, rows, kBlock, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t c = 0; c < C; c += bV::size()) {
          auto [x0, x1] = convert_to_float<bf>(bV::loadu(xg + r * C + c));
          auto y0 = fmadd(x0, fV::loadu(A + c), fV::loadu(B + c));
          auto y1 = fmadd(x1, fV::loadu(A + c + kHalf), fV::loadu(B + c + kHalf));
          if (rg) {  // as the separate kernels do: the norm rounded to bf16, then the addition
            auto [n0, n1] = convert_to_float<bf>(convert_from_float<bf>(y0, y1));
            auto [r0, r1] = convert_to_float<bf>(bV::loadu(rg + r * C + c));
            y0 = n0 + r0; y1 = n1 + r1;
            mg[(r * C + c) / 32] = positive(y0) | positive(y1) << 16;
          }
          convert_from_float<bf>(clamp_min(y0, fV(0)), clamp_min(y1, fV(0))).store(yg + r * C + c);
        }
    });
  }
  return {y, mean, invstd, var, mask};
}

// The gradients of x, weight and bias (and, with a residual, of the residual: the
// gradient through the ReLU) from that of y, given the forward's input, statistics and,
// with a residual, its mask.
std::vector<at::Tensor> backward(at::Tensor gy, at::Tensor x, c10::optional<at::Tensor> mask_if_residual,
                                 at::Tensor mean, at::Tensor invstd, at::Tensor weight, at::Tensor bias) {
  gy = gy.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t groups = mean.size(0), C = x.size(1), rows = x.numel() / C / groups;
  const bool residual = mask_if_residual.has_value();
  auto gx = at::empty_like(x);
  auto gr = residual ? at::empty_like(x) : at::Tensor();
  auto gw = at::empty({C}, weight.options()), gb = at::empty({C}, weight.options());
  std::vector<double> sg(C), sgx(C), dw(C, 0.0), db(C, 0.0);
  std::vector<float> scale(C), shift(C), k1(C), k2(C), k3(C);
  const float *w = weight.data_ptr<float>(), *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t off = g * rows * C;
    const bf *gp = gy.data_ptr<bf>() + off, *xp = x.data_ptr<bf>() + off;
    const uint32_t* bits = residual ? reinterpret_cast<const uint32_t*>(mask_if_residual->data_ptr<int32_t>()) + off / 32
                                    : nullptr;
    bf* op = gx.data_ptr<bf>() + off;
    bf* rp = residual ? gr.data_ptr<bf>() + off : nullptr;
    affine(w, bias.data_ptr<float>(), mp + g * C, ip + g * C, C, scale.data(), shift.data());
    const float *A = scale.data(), *B = shift.data();
    channel_sums(xp, gp, bits, A, B, rows, C, sg.data(), sgx.data());
    for (int64_t c = 0; c < C; ++c) {
      // with g the gradient through the ReLU: dx = (g - mean(g) - xhat * mean(g * xhat)) * invstd * w
      double m = mp[g * C + c], is = ip[g * C + c];
      double dot = sgx[c] - m * sg[c];  // the sum of g * (x - mean)
      dw[c] += dot * is; db[c] += sg[c];
      double a = is * w[c], bc = -is * is * is * w[c] * dot / rows;
      k1[c] = a; k2[c] = bc; k3[c] = -a * sg[c] / rows - m * bc;
    }
    const float *K1 = k1.data(), *K2 = k2.data(), *K3 = k3.data();
    at::parallel_for(0, rows, kBlock, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t c = 0; c < C; c += bV::size()) {
          auto [x0, x1] = convert_to_float<bf>(bV::loadu(xp + r * C + c));
          auto [g0, g1] = convert_to_float<bf>(bV::loadu(gp + r * C + c));
          relu_mask(g0, g1, x0, x1, bits ? bits + (r * C + c) / 32 : nullptr, A + c, B + c);
          if (rp) convert_from_float<bf>(g0, g1).store(rp + r * C + c);
          auto o0 = fmadd(g0, fV::loadu(K1 + c), fmadd(x0, fV::loadu(K2 + c), fV::loadu(K3 + c)));
          auto o1 = fmadd(g1, fV::loadu(K1 + c + kHalf), fmadd(x1, fV::loadu(K2 + c + kHalf), fV::loadu(K3 + c + kHalf)));
          convert_from_float<bf>(o0, o1).store(op + r * C + c);
        }
    });
  }
  float *gwp = gw.data_ptr<float>(), *gbp = gb.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) { gwp[c] = dw[c]; gbp[c] = db[c]; }
  return {gx, gw, gb, gr};
}
"""

FLAGS = ["-O3", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512dq", "-mfma", "-fopenmp"]


def build_name(torch_dir: str) -> str:
    """The extension's name, and so its build folder: one per source, flags and torch
    installation. The build file names torch's include and library folders, so two
    environments sharing one name would each rebuild the kernels (about 20 s) whenever
    the other had run last, and replace them under each other."""
    key = "\0".join([_SOURCE, *FLAGS, torch_dir])
    return "largebatch_bn_relu_" + hashlib.sha1(key.encode()).hexdigest()[:12]


NAME = build_name(os.path.dirname(os.path.abspath(torch.__file__)))  # as torch names it in the build file
_extension = None
_failed = False
STALE_LOCK_S = 600  # a build lock this old was left by a killed build: torch would wait on it forever


def extension():
    """The compiled kernels, or None where they cannot be built (said once, on stderr)."""
    global _extension, _failed
    if _extension is None and not _failed:
        try:
            cpp_extension = _import_cpp_extension()
            lock = Path(cpp_extension._get_build_directory(NAME, False)) / "lock"
            if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                lock.unlink(missing_ok=True)
            t0 = time.perf_counter()
            _extension = cpp_extension.load_inline(NAME, cpp_sources=_SOURCE, functions=["forward", "backward"],
                                                   extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])
            built = time.perf_counter() - t0
            if built > 5 and dist.info().is_main:
                print(f"largebatch: built the fused batch-norm + ReLU kernels in {built:.0f} s (once: "
                      f"cached in {lock.parent})", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - a missing compiler or ninja surfaces in many types
            _failed = True
            print(f"largebatch: fused batch norm + ReLU unavailable ({str(e).strip().splitlines()[-1][:200]}); "
                  f"BN and ReLU run as separate kernels", file=sys.stderr)
    return _extension


def _import_cpp_extension():
    """torch's extension loader, without the warning its import logs where it finds a CUDA
    toolkit but no GPU: these kernels are CPU code."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def applies(x: torch.Tensor, channels: int, residual: torch.Tensor | None = None) -> bool:
    """Whether the fused kernels take this input (and residual): bf16 channels_last,
    channels a multiple of 32, on a CPU with the AVX-512 they are built for."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 4 and channels % 32 == 0
            and x.is_contiguous(memory_format=torch.channels_last) and not torch.compiler.is_compiling()
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))
            and torch.backends.cpu.get_cpu_capability() == "AVX512" and extension() is not None)


class BNReLU(torch.autograd.Function):
    """relu(batch_norm(x) [+ residual]) over `groups` groups of samples; also returns
    each group's mean and unbiased variance (for the running averages; no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, groups: int, eps: float):
        y, mean, invstd, var, mask = extension().forward(x, weight.float(), bias.float(), residual, groups, eps)
        # the ReLU's mask: as bits with a residual, else found again from x
        ctx.save_for_backward(x, mask if residual is not None else None, mean, invstd, weight, bias)
        ctx.residual = residual is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        x, mask, mean, invstd, weight, bias = ctx.saved_tensors
        dx, dw, db, dr = extension().backward(dy, x, mask, mean, invstd, weight.float(), bias.float())
        return dx, dw.to(weight.dtype), db.to(weight.dtype), dr if ctx.residual else None, None, None

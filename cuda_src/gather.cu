// Gather-and-scale: the sampled operands of crs.
//
//   la_gather_scale_<dt>: out[o, j, i] = src[o, idx[j], i] * T(scale[j]) for src viewed as
//   (outer, d, inner) in memory order and out as (outer, k, inner): t.index_select(dim, idx)
//   then a per-index scale, in one pass. The scale is rounded to T before the multiply, as
//   `t.mul_(scale.to(t.dtype))` does; scale == nullptr gathers only. An index outside [0, d)
//   writes NaN (not checked on the host: that would need a synchronisation).
//
// Launch: blockDim (bx, by) with bx * by == LA_THREADS; threadIdx.x walks the units (16-byte
// vectors where inner allows them, else elements) of one output row, threadIdx.y the rows,
// so a short row (a channels-last channel gather, inner == 1) still fills the warps.
#include "la_common.cuh"

template <class T>
__device__ __forceinline__ void la_gather_scale(const T* __restrict__ src, const la_i64* __restrict__ idx,
                                                const float* __restrict__ scale, T* __restrict__ out, la_i64 outer,
                                                la_i64 d, la_i64 k, la_i64 inner) {
    constexpr int V = LaVec<T>::N;
    const bool vec = (inner % V == 0) && la_aligned16(src) && la_aligned16(out);
    const int width = vec ? V : 1;
    // The host guarantees k * inner < 2^31, so the per-row index math runs in 32 bits.
    const unsigned int units_inner = static_cast<unsigned int>(inner / width);
    const unsigned int units = static_cast<unsigned int>(k) * units_inner;
    const float nan = __int_as_float(0x7fffffff);
    for (la_i64 o = static_cast<la_i64>(blockIdx.y) * blockDim.y + threadIdx.y; o < outer;
         o += static_cast<la_i64>(gridDim.y) * blockDim.y) {
        const T* src_row = src + o * d * inner;
        T* out_row = out + o * k * inner;
        for (unsigned int j = blockIdx.x * blockDim.x + threadIdx.x; j < units; j += gridDim.x * blockDim.x) {
            const unsigned int kk = j / units_inner;
            const unsigned int ii = (j - kk * units_inner) * width;
            const la_i64 id = idx[kk];
            const bool ok = id >= 0 && id < d;
            const float s = scale == nullptr ? 1.f : la_round_to<T>(scale[kk]);
            const T* from = src_row + (ok ? id : 0) * inner + ii;
            T* to = out_row + static_cast<la_i64>(kk) * inner + ii;
            if (vec) {
                float v[V];
                la_load_vec(from, v);
#pragma unroll
                for (int e = 0; e < V; ++e) v[e] = ok ? v[e] * s : nan;
                la_store_vec(to, v);
            } else {
                *to = la_from_float<T>(ok ? la_to_float(*from) * s : nan);
            }
        }
    }
}

#define LA_GATHER(T, suffix)                                                                                \
    extern "C" __global__ void                                                \
        la_gather_scale_##suffix(const T* src, const la_i64* idx, const float* scale, T* out, la_i64 outer,  \
                                 la_i64 d, la_i64 k, la_i64 inner) {                                        \
        la_gather_scale<T>(src, idx, scale, out, outer, d, k, inner);                                       \
    }
LA_FOR_EACH_DTYPE(LA_GATHER)

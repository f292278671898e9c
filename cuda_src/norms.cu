// Norms for column-row sampling (crs, bernoulli_crs, topk).
//
//   la_sumsq_rows_<dt>:  sum of squares (or its root, flag=1) of contiguous rows: per-sample
//                        norms of any tensor (a sample is one contiguous block in NCHW and in
//                        channels-last memory), per-plane squared norms of an NCHW tensor.
//   la_sumsq_cols_<dt>:  per-(sample, channel) squared norms of a channels-last tensor.
//   la_sumsq_finalize:   combines the pieces when a row was split over several warps.
//   la_plane_marginals:  from the (N, C) squared plane norms, both sampling weights crs needs
//                        from dy in one launch: per-sample norms sqrt(sum_c) and per-channel
//                        norms sqrt(sum_n).
#include "la_common.cuh"

#define LA_SUMSQ(T, suffix) LA_PLANE_KERNELS(sumsq, LaSumSq, T, suffix)
LA_FOR_EACH_DTYPE(LA_SUMSQ)
LA_FINALIZE_KERNEL(sumsq, LaSumSq)

// Blocks [0, row_blocks) reduce rows of sq (one warp per sample), the others columns (one
// thread per channel, coalesced across the warp).
extern "C" __global__ void
    la_plane_marginals(const float* __restrict__ sq, la_i64 n, la_i64 c, int row_blocks,
                       float* __restrict__ per_sample, float* __restrict__ per_channel) {
    if (static_cast<int>(blockIdx.x) < row_blocks) {
        const int lane = threadIdx.x % LA_WARP;
        const la_i64 warps = static_cast<la_i64>(row_blocks) * blockDim.x / LA_WARP;
        for (la_i64 row = (static_cast<la_i64>(blockIdx.x) * blockDim.x + threadIdx.x) / LA_WARP; row < n;
             row += warps) {
            float s = 0.f;
            for (la_i64 j = lane; j < c; j += LA_WARP) s += sq[row * c + j];
            s = la_warp_sum(s);
            if (lane == 0) per_sample[row] = sqrtf(s);
        }
    } else {
        const la_i64 threads = static_cast<la_i64>(gridDim.x - row_blocks) * blockDim.x;
        for (la_i64 ch = static_cast<la_i64>(blockIdx.x - row_blocks) * blockDim.x + threadIdx.x; ch < c;
             ch += threads) {
            float s = 0.f;
            for (la_i64 i = 0; i < n; ++i) s += sq[i * c + ch];
            per_channel[ch] = sqrtf(s);
        }
    }
}

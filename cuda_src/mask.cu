// Live slices of a ReLU output (relu_mask).
//
//   la_nonzero_rows_<dt> / la_nonzero_cols_<dt> / la_nonzero_finalize: non-zeros per
//       (sample, channel) plane, int64 (N, C), as lightning_approx.ops.mask.plane_nonzeros:
//       torch.count_nonzero(x.reshape(n, c, -1), 2), except that a plane with a NaN counts as
//       full (flag = the plane size).
//   la_live_summarize: from the counts, flags of the live samples and channels, and the
//       totals stats[2] = non-zero entries, stats[3] = dead (all-zero) planes.
//   la_live_compact: block 0 turns the sample flags, block 1 the channel flags into sorted
//       index lists (stream compaction with a block-wide ballot scan); stats[0] / stats[1]
//       get the live counts. The host reads the four stats with one copy.
#include "la_common.cuh"

#define LA_NONZERO(T, suffix) LA_PLANE_KERNELS(nonzero, LaCountNonzero, T, suffix)
LA_FOR_EACH_DTYPE(LA_NONZERO)
LA_FINALIZE_KERNEL(nonzero, LaCountNonzero)

// flags (zeroed by the caller): [0, n) samples, [n, n + c) channels. Plain stores of 1 race
// benignly: every writer writes the same value.
extern "C" __global__ void
    la_live_summarize(const la_i64* __restrict__ counts, la_i64 n, la_i64 c, int* __restrict__ flags,
                      la_u64* __restrict__ stats) {
    la_u64 nonzero = 0, dead = 0;
    for (la_i64 t = static_cast<la_i64>(blockIdx.x) * blockDim.x + threadIdx.x; t < n * c;
         t += static_cast<la_i64>(gridDim.x) * blockDim.x) {
        const la_i64 cnt = counts[t];
        if (cnt > 0) {
            const la_i64 sample = t / c;
            flags[sample] = 1;
            flags[n + (t - sample * c)] = 1;
        } else {
            ++dead;
        }
        nonzero += static_cast<la_u64>(cnt);
    }
    nonzero = la_block_sum(nonzero);
    dead = la_block_sum(dead);
    if (threadIdx.x == 0) {
        atomicAdd(stats + 2, nonzero);
        atomicAdd(stats + 3, dead);
    }
}

// Writes the positions of the set flags, in increasing order, to indices; the count to *count.
__device__ __forceinline__ void la_compact(const int* __restrict__ flags, la_i64 len, la_i64* __restrict__ indices,
                                           la_u64* __restrict__ count) {
    __shared__ unsigned int warp_offset[LA_WARP + 1];  // [LA_WARP]: the tile's total
    const int lane = threadIdx.x % LA_WARP;
    const int warp = threadIdx.x / LA_WARP;
    const int nwarps = blockDim.x / LA_WARP;
    const unsigned int lanes_below = (1u << lane) - 1u;
    la_i64 base = 0;
    for (la_i64 tile = 0; tile < len; tile += blockDim.x) {
        const la_i64 i = tile + threadIdx.x;
        const bool live = i < len && flags[i] != 0;
        const unsigned int ballot = __ballot_sync(LA_FULL_MASK, live);
        if (lane == 0) warp_offset[warp] = __popc(ballot);
        __syncthreads();
        if (warp == 0) {  // exclusive scan of the per-warp counts
            const unsigned int own = lane < nwarps ? warp_offset[lane] : 0u;
            unsigned int incl = own;
#pragma unroll
            for (int m = 1; m < LA_WARP; m <<= 1) {
                const unsigned int up = __shfl_up_sync(LA_FULL_MASK, incl, m);
                if (lane >= m) incl += up;
            }
            if (lane < nwarps) warp_offset[lane] = incl - own;
            if (lane == LA_WARP - 1) warp_offset[LA_WARP] = incl;
        }
        __syncthreads();
        if (live) indices[base + warp_offset[warp] + __popc(ballot & lanes_below)] = i;
        base += warp_offset[LA_WARP];
        __syncthreads();  // warp_offset is rewritten by the next tile
    }
    if (threadIdx.x == 0) *count = static_cast<la_u64>(base);
}

// Launch with 2 blocks: block 0 compacts the sample flags, block 1 the channel flags.
extern "C" __global__ void
    la_live_compact(const int* __restrict__ flags, la_i64 n, la_i64 c, la_i64* __restrict__ samples,
                    la_i64* __restrict__ channels, la_u64* __restrict__ stats) {
    if (blockIdx.x == 0) {
        la_compact(flags, n, samples, stats + 0);
    } else {
        la_compact(flags + n, c, channels, stats + 1);
    }
}

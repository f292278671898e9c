// Patch-based weight gradient (after Wang & Nelaturu): each (sample n, output channel c)
// contributes one input patch, the one under the output position where |dy[n, c]| is
// largest, weighted by the sum of dy[n, c] over all positions:
//
//     gW[c] = sum_n (sum_pos dy[n, c, pos]) * patch(x_n, p*(n, c)),  p* = argmax_pos |dy[n, c, pos]|
//
// with the conv's stride, padding, dilation and groups (patch rows outside x are zero).
//
//   la_argmax_sum_rows_<dt> / la_argmax_sum_cols_<dt> / la_argmax_sum_finalize: one pass
//       over dy (NCHW planes or channels-last) giving p* (int64, first maximum on ties, NaN
//       largest, as torch.argmax) and the plane sum (float32), both (N, C).
//   la_patch_accumulate_<dt>: gW (float32) from x and the (position, sum) pairs; the caller
//       may pass any positions (the "random" variant draws them uniformly).
//
// la_patch_accumulate: one thread per weight element, looping over the samples in a fixed
// order (no atomics, deterministic). blockDim.y output channels per block; threadIdx.x walks
// the patch elements, input channel innermost for channels-last x (a warp reads 32
// consecutive channels) and kernel column innermost for NCHW x. The patch origin of each
// (sample, channel) is decoded once per block into shared memory.
#include "la_common.cuh"

#define LA_ARGMAX(T, suffix) LA_PLANE_KERNELS(argmax_sum, LaAbsArgmaxSum, T, suffix)
LA_FOR_EACH_DTYPE(LA_ARGMAX)
LA_FINALIZE_KERNEL(argmax_sum, LaAbsArgmaxSum)

template <class T>
__device__ __forceinline__ void la_patch_accumulate(const T* __restrict__ x, const la_i64* __restrict__ pos,
                                                    const float* __restrict__ sums, float* __restrict__ out,
                                                    la_i64 n, la_i64 cin, int h, int w, la_i64 cout, la_i64 wo,
                                                    int cin_g, int kh, int kw, int sh, int sw, int ph, int pw,
                                                    int dh, int dw, int groups, int x_cl, int out_cl) {
    __shared__ int origin_y[LA_THREADS];
    __shared__ int origin_x[LA_THREADS];
    __shared__ float weight[LA_THREADS];
    const int patch = cin_g * kh * kw;
    const la_i64 cout_g = cout / groups;
    const int slot = threadIdx.y * blockDim.x + threadIdx.x;
    for (la_i64 c0 = static_cast<la_i64>(blockIdx.y) * blockDim.y; c0 < cout;
         c0 += static_cast<la_i64>(gridDim.y) * blockDim.y) {
        const la_i64 c = c0 + threadIdx.y;
        const bool c_ok = c < cout;
        const la_i64 chan0 = c_ok ? static_cast<la_i64>(static_cast<int>(c) / static_cast<int>(cout_g)) * cin_g : 0;  // first input channel of c's group
        for (int r0 = blockIdx.x * blockDim.x; r0 < patch; r0 += gridDim.x * blockDim.x) {
            const int r = r0 + threadIdx.x;
            const bool ok = c_ok && r < patch;
            int ci, ki, kj;
            if (x_cl) {
                ci = r % cin_g;
                const int t = r / cin_g;
                kj = t % kw;
                ki = t / kw;
            } else {
                kj = r % kw;
                const int t = r / kw;
                ki = t % kh;
                ci = t / kh;
            }
            const int dy_off = ki * dh, dx_off = kj * dw;
            float acc = 0.f;
            for (la_i64 n0 = 0; n0 < n; n0 += blockDim.x) {
                // Stage: thread (x, y) decodes sample n0 + x of channel c.
                __syncthreads();
                const la_i64 ns = n0 + threadIdx.x;
                if (c_ok && ns < n) {
                    const int p = static_cast<int>(pos[ns * cout + c]);  // a plane has < 2^31 positions
                    const int oy = p / static_cast<int>(wo);
                    origin_y[slot] = oy * sh - ph;
                    origin_x[slot] = (p - oy * static_cast<int>(wo)) * sw - pw;
                    weight[slot] = sums[ns * cout + c];
                }
                __syncthreads();
                if (ok) {
                    const int tile = static_cast<int>(min(static_cast<la_i64>(blockDim.x), n - n0));
                    const int base = threadIdx.y * blockDim.x;
                    for (int j = 0; j < tile; ++j) {
                        const int iy = origin_y[base + j] + dy_off;
                        const int ix = origin_x[base + j] + dx_off;
                        if (iy >= 0 && iy < h && ix >= 0 && ix < w) {
                            const la_i64 sample = n0 + j;
                            const la_i64 off = x_cl ? ((sample * h + iy) * w + ix) * cin + chan0 + ci
                                                    : ((sample * cin + chan0 + ci) * h + iy) * w + ix;
                            acc = fmaf(weight[base + j], la_to_float(x[off]), acc);
                        }
                    }
                }
            }
            if (ok) {
                const la_i64 o = out_cl ? ((c * kh + ki) * kw + kj) * cin_g + ci
                                        : ((c * cin_g + ci) * kh + ki) * kw + kj;
                out[o] = acc;
            }
        }
    }
}

#define LA_PATCH(T, suffix)                                                                                  \
    extern "C" __global__ void la_patch_accumulate_##suffix(                                                 \
        const T* x, const la_i64* pos, const float* sums, float* out, la_i64 n, la_i64 cin, la_i64 h, la_i64 w, \
        la_i64 cout, la_i64 ho, la_i64 wo, int cin_g, int kh, int kw, int sh, int sw, int ph, int pw, int dh,  \
        int dw, int groups, int x_cl, int out_cl) {                                                          \
        la_patch_accumulate<T>(x, pos, sums, out, n, cin, static_cast<int>(h), static_cast<int>(w), cout, wo,  \
                               cin_g, kh, kw, sh, sw, ph, pw, dh, dw, groups, x_cl, out_cl);                 \
    }
LA_FOR_EACH_DTYPE(LA_PATCH)

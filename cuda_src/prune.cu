// Stochastic gradient pruning (grad_prune; Ye et al., ECCV 2020): small entries are rounded to
// 0 or to +-tau, unbiasedly, so the gradient keeps its mean while a fraction of it becomes zero.
// Reference: lightning_approx.ops.prune.stochastic_prune.
//
// sigma = sqrt(pi / 2) * mean|g| (the scale of a zero-mean normal with that mean absolute value)
// and tau = Phi^-1((1 + p) / 2) * sigma, both float32 as in the reference; the host passes the
// quantile Phi^-1((1 + p) / 2). An entry with |g| < T(tau) becomes T(tau) * sign(g) when
// u * tau < |g| (u uniform in [0, 1)), else 0; larger entries (and NaN) pass through.
//
//   la_prune_abssum_<dt>: per-block partial sums of |g| (one read of g).
//   la_prune_apply_<dt>:  every block first folds the partial sums in the same fixed order
//       (so all blocks agree on tau bit for bit), then rounds its elements (second read of
//       g, one write) and adds its non-zero outputs to *nnz (zeroed by the caller).
//
// Randomness: Philox4x32-10 keyed by the seed, counter = (element / 4, offset); element e
// uses word e % 4. The draw of an element depends only on (seed, offset, e), not on the
// launch shape or on the vector path.
#include "la_common.cuh"

template <class T>
__device__ __forceinline__ void la_prune_abssum(const T* __restrict__ g, la_i64 n, float* __restrict__ partial) {
    constexpr int V = LaVec<T>::N;
    const la_i64 tid = static_cast<la_i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    const la_i64 threads = static_cast<la_i64>(gridDim.x) * blockDim.x;
    float s = 0.f;
    la_i64 head = 0;  // elements before the first 16-byte boundary
    if (la_aligned16(g)) {
        const la_i64 nvec = n / V;
        la_i64 i = tid;
        for (; i + threads < nvec; i += 2 * threads) {  // two loads in flight
            float a[V], b[V];
            la_load_vec(g + i * V, a);
            la_load_vec(g + (i + threads) * V, b);
#pragma unroll
            for (int j = 0; j < V; ++j) s += fabsf(a[j]) + fabsf(b[j]);
        }
        for (; i < nvec; i += threads) {
            float a[V];
            la_load_vec(g + i * V, a);
#pragma unroll
            for (int j = 0; j < V; ++j) s += fabsf(a[j]);
        }
        head = nvec * V;  // the scalar loop below takes the tail
    }
    for (la_i64 i = head + tid; i < n; i += threads) s += fabsf(la_to_float(g[i]));
    s = la_block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// The rounding of one element with its Philox word: tau_t is tau rounded to T (the threshold
// and the written magnitude), tau the float32 value (the keep probability |g| / tau).
__device__ __forceinline__ float la_prune_one(float v, float tau, float tau_t, unsigned int bits, la_u64& kept) {
    const float a = fabsf(v);
    float r;
    if (!(a < tau_t)) {
        r = v;  // large entries (and NaN) pass through
    } else {
        r = (la_uniform(bits) * tau < a) ? copysignf(tau_t, v) : 0.f;
    }
    kept += (r != 0.f) ? 1ull : 0ull;
    return r;
}

template <class T>
__device__ __forceinline__ void la_prune_apply(const T* __restrict__ g, T* __restrict__ out, la_i64 n,
                                               const float* __restrict__ partial, int nparts, float quantile,
                                               const la_u64* __restrict__ seed_ptr, la_u64 seed_value,
                                               la_u64 offset, la_u64* __restrict__ nnz) {
    constexpr int V = LaVec<T>::N;
    // tau, identically in every block.
    float total = 0.f;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) total += partial[i];
    total = la_block_sum(total);
    const float sigma = 1.2533141373155003f * (total / static_cast<float>(n));  // sqrt(pi / 2) * mean|g|
    const float tau = sigma * quantile;
    const float tau_t = la_round_to<T>(tau);
    const la_u64 seed = seed_ptr != nullptr ? *seed_ptr : seed_value;

    const la_i64 tid = static_cast<la_i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    const la_i64 threads = static_cast<la_i64>(gridDim.x) * blockDim.x;
    la_u64 kept = 0;
    la_i64 head = 0;
    if (la_aligned16(g) && la_aligned16(out)) {
        const la_i64 nvec = n / V;
        for (la_i64 i = tid; i < nvec; i += threads) {
            float v[V];
            la_load_vec(g + i * V, v);
#pragma unroll
            for (int q = 0; q < V / 4; ++q) {  // V is 4 or 8: one Philox call per 4 elements
                const LaPhilox r = la_philox(seed, static_cast<la_u64>(i) * (V / 4) + q, offset);
#pragma unroll
                for (int j = 0; j < 4; ++j) v[q * 4 + j] = la_prune_one(v[q * 4 + j], tau, tau_t, r.v[j], kept);
            }
            la_store_vec(out + i * V, v);
        }
        head = nvec * V;
    }
    for (la_i64 e = head + tid; e < n; e += threads) {
        const LaPhilox r = la_philox(seed, static_cast<la_u64>(e) >> 2, offset);
        out[e] = la_from_float<T>(la_prune_one(la_to_float(g[e]), tau, tau_t, r.v[e & 3], kept));
    }
    kept = la_block_sum(kept);
    if (threadIdx.x == 0 && kept != 0) atomicAdd(nnz, kept);
}

#define LA_PRUNE(T, suffix)                                                                                 \
    extern "C" __global__ void                                                \
        la_prune_abssum_##suffix(const T* g, la_i64 n, float* partial) {                                    \
        la_prune_abssum<T>(g, n, partial);                                                                  \
    }                                                                                                       \
    extern "C" __global__ void                                                \
        la_prune_apply_##suffix(const T* g, T* out, la_i64 n, const float* partial, int nparts,              \
                                float quantile, const la_u64* seed_ptr, la_u64 seed_value, la_u64 offset,    \
                                la_u64* nnz) {                                                               \
        la_prune_apply<T>(g, out, n, partial, nparts, quantile, seed_ptr, seed_value, offset, nnz);         \
    }
LA_FOR_EACH_DTYPE(LA_PRUNE)

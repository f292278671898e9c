// Shared device code of the lightning-approx kernels: storage types, vector loads, warp and
// block reductions, the two plane-reduction schemes, and a Philox4x32-10 generator.
//
// Self-contained on purpose: no CUDA header is included, so NVRTC compiles these files with
// no -I option at all (cuda_fp16.h / cuda_bf16.h are not shipped with NVRTC and pull in
// cuda_runtime headers). Half and bfloat16 values are stored as raw 16-bit words and
// converted with the PTX cvt instructions the headers use themselves.
//
// The loader inlines this file into each .cu before compiling (so CuPy's cache key covers
// it); nvcc finds it next to the .cu.
#pragma once

// Every kernel is launched with at most LA_THREADS threads per block (shared arrays are sized
// for it). No __launch_bounds__: with it ptxas (CUDA 13.0) traded registers for spills in some
// kernels; without, none spills.
#define LA_THREADS 256
#define LA_WARP 32
#define LA_FULL_MASK 0xffffffffu

typedef long long la_i64;
typedef unsigned long long la_u64;

// ---------------------------------------------------------------------------------------
// Storage types and conversions (all arithmetic is float32).
// ---------------------------------------------------------------------------------------
struct __align__(2) la_half {
    unsigned short bits;
};
struct __align__(2) la_bf16 {
    unsigned short bits;
};

// The PTX conversions run on the GPU; the portable branches (no __CUDA_ARCH__) let the
// kernels run in the CPU emulator of tests/kernels, bit-identical (round to nearest even).
__device__ __forceinline__ float la_to_float(float v) { return v; }

__device__ __forceinline__ float la_to_float(la_half v) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
#else
    const unsigned int sign = (v.bits & 0x8000u) << 16, exp = (v.bits >> 10) & 0x1fu, mant = v.bits & 0x3ffu;
    if (exp == 0) return copysignf(static_cast<float>(mant) * 5.9604644775390625e-8f, sign ? -1.f : 1.f);
    if (exp == 31) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
    return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

__device__ __forceinline__ float la_to_float(la_bf16 v) {
    return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}

template <class T>
__device__ __forceinline__ T la_from_float(float f);

template <>
__device__ __forceinline__ float la_from_float<float>(float f) {
    return f;
}

template <>
__device__ __forceinline__ la_half la_from_float<la_half>(float f) {
    la_half h;
#ifdef __CUDA_ARCH__
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
#else
    // Round to nearest even through float additions (F. Giesen, float_to_half_fast3_rtne).
    unsigned int u = __float_as_uint(f);
    const unsigned int sign = u & 0x80000000u;
    u ^= sign;
    unsigned int o;
    if (u >= 0x47800000u) {  // >= 65536: inf, or NaN
        o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
    } else if (u < 0x38800000u) {  // below the smallest normal half: the float adder rounds
        const float magic = __uint_as_float(126u << 23);
        o = __float_as_uint(__uint_as_float(u) + magic) - (126u << 23);
    } else {
        const unsigned int odd = (u >> 13) & 1u;
        u += 0xc8000fffu + odd;  // rebias the exponent (15 - 127) and round
        o = u >> 13;
    }
    h.bits = static_cast<unsigned short>(o | (sign >> 16));
#endif
    return h;
}

template <>
__device__ __forceinline__ la_bf16 la_from_float<la_bf16>(float f) {
    la_bf16 h;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
#else
    // Round to nearest even by hand (cvt.bf16 needs sm_80); NaN stays a quiet NaN.
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        h.bits = static_cast<unsigned short>((u >> 16) | 0x40u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        h.bits = static_cast<unsigned short>(u >> 16);
    }
#endif
    return h;
}

// Rounds a float to the precision of T (what PyTorch does when it casts a scalar to T).
template <class T>
__device__ __forceinline__ float la_round_to(float f) {
    return la_to_float(la_from_float<T>(f));
}

__device__ __forceinline__ bool la_isnan(float f) { return f != f; }

// ---------------------------------------------------------------------------------------
// 16-byte vectors: 4 floats or 8 half / bfloat16 values per load.
// ---------------------------------------------------------------------------------------
template <class T>
struct LaVec {
    static constexpr int N = 16 / sizeof(T);
};

template <class T>
__device__ __forceinline__ bool la_aligned16(const T* p) {
    return (reinterpret_cast<la_u64>(p) & 15ull) == 0;
}

__device__ __forceinline__ void la_unpack(const uint4& r, float (&v)[4]) {
    v[0] = __uint_as_float(r.x);
    v[1] = __uint_as_float(r.y);
    v[2] = __uint_as_float(r.z);
    v[3] = __uint_as_float(r.w);
}

template <class T16>
__device__ __forceinline__ void la_unpack16(const uint4& r, float (&v)[8]) {
    const unsigned int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        T16 lo, hi;
        lo.bits = static_cast<unsigned short>(w[i] & 0xffffu);
        hi.bits = static_cast<unsigned short>(w[i] >> 16);
        v[2 * i] = la_to_float(lo);
        v[2 * i + 1] = la_to_float(hi);
    }
}

// Loads LaVec<T>::N consecutive values (p must be 16-byte aligned) as floats.
__device__ __forceinline__ void la_load_vec(const float* p, float (&v)[4]) {
    la_unpack(*reinterpret_cast<const uint4*>(p), v);
}
__device__ __forceinline__ void la_load_vec(const la_half* p, float (&v)[8]) {
    la_unpack16<la_half>(*reinterpret_cast<const uint4*>(p), v);
}
__device__ __forceinline__ void la_load_vec(const la_bf16* p, float (&v)[8]) {
    la_unpack16<la_bf16>(*reinterpret_cast<const uint4*>(p), v);
}

// Stores LaVec<T>::N floats as T (p must be 16-byte aligned).
__device__ __forceinline__ void la_store_vec(float* p, const float (&v)[4]) {
    *reinterpret_cast<uint4*>(p) =
        make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
}

template <class T16>
__device__ __forceinline__ void la_store_vec16(T16* p, const float (&v)[8]) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const unsigned int lo = la_from_float<T16>(v[2 * i]).bits;
        const unsigned int hi = la_from_float<T16>(v[2 * i + 1]).bits;
        w[i] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ void la_store_vec(la_half* p, const float (&v)[8]) { la_store_vec16(p, v); }
__device__ __forceinline__ void la_store_vec(la_bf16* p, const float (&v)[8]) { la_store_vec16(p, v); }

// ---------------------------------------------------------------------------------------
// Reductions.
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ float la_warp_sum(float v) {
#pragma unroll
    for (int m = LA_WARP / 2; m > 0; m >>= 1) v += __shfl_xor_sync(LA_FULL_MASK, v, m);
    return v;
}

__device__ __forceinline__ la_u64 la_warp_sum(la_u64 v) {
#pragma unroll
    for (int m = LA_WARP / 2; m > 0; m >>= 1) v += __shfl_xor_sync(LA_FULL_MASK, v, m);
    return v;
}

// Sum over the block, valid in every thread. Every thread must call it; the block must have
// a whole number of warps (at most 32 of them). The fixed order makes it deterministic.
template <class V>
__device__ __forceinline__ V la_block_sum(V v) {
    __shared__ V warp_sums[LA_WARP];
    const int lane = threadIdx.x % LA_WARP;
    const int warp = threadIdx.x / LA_WARP;
    const int nwarps = blockDim.x / LA_WARP;
    v = la_warp_sum(v);
    __syncthreads();  // warp_sums may still be read by a previous call
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = lane < nwarps ? warp_sums[lane] : V(0);
    return la_warp_sum(v);
}

// --- Reduction operators over the positions of a plane ---------------------------------
// An operator has a State, a neutral init(), add(state, value, position), an associative
// combine(a, b), shfl_xor for warp reductions and finish(), which writes the result of
// one plane to the outputs out0 / out1.

// Sum of squares (flag = 1: write its square root). Output: float.
struct LaSumSq {
    typedef float State;
    __device__ __forceinline__ static State init() { return 0.f; }
    __device__ __forceinline__ static void add(State& s, float v, la_i64) { s = fmaf(v, v, s); }
    __device__ __forceinline__ static State combine(State a, State b) { return a + b; }
    __device__ __forceinline__ static State shfl_xor(State s, int m) { return __shfl_xor_sync(LA_FULL_MASK, s, m); }
    __device__ __forceinline__ static void finish(void* out0, void*, la_i64 i, State s, int flag) {
        static_cast<float*>(out0)[i] = flag ? sqrtf(s) : s;
    }
};

// Number of non-zero entries (-0 is zero); a plane holding a NaN counts as full, so it stays
// live and its NaN reaches the gradients as in the dense backward (lightning_approx.ops.mask.
// plane_nonzeros). The top bit of the state marks a NaN; finish() gets the plane size as flag.
// Output: int64.
struct LaCountNonzero {
    typedef unsigned int State;
    static constexpr unsigned int kNaN = 0x80000000u;
    __device__ __forceinline__ static State init() { return 0u; }
    __device__ __forceinline__ static void add(State& s, float v, la_i64) {
        s += (v != 0.f) ? 1u : 0u;
        if (la_isnan(v)) s |= kNaN;
    }
    __device__ __forceinline__ static State combine(State a, State b) {
        return ((a | b) & kNaN) | ((a & ~kNaN) + (b & ~kNaN));
    }
    __device__ __forceinline__ static State shfl_xor(State s, int m) { return __shfl_xor_sync(LA_FULL_MASK, s, m); }
    __device__ __forceinline__ static void finish(void* out0, void*, la_i64 i, State s, int plane) {
        static_cast<la_i64*>(out0)[i] = (s & kNaN) ? static_cast<la_i64>(plane) : static_cast<la_i64>(s & ~kNaN);
    }
};

// Position of the largest |v| (first one on ties, NaN largest: torch.argmax) and the sum of
// the plane. Outputs: int64 position (out0), float sum (out1).
struct LaAbsArgmaxSum {
    struct State {
        float amax;
        int pos;
        float sum;
    };
    __device__ __forceinline__ static State init() {
        State s;
        s.amax = -1.f;  // below every |v|, so the first position always replaces it
        s.pos = 0x7fffffff;
        s.sum = 0.f;
        return s;
    }
    // Whether (a, pa) should be chosen over (b, pb).
    __device__ __forceinline__ static bool better(float a, int pa, float b, int pb) {
        const bool na = la_isnan(a), nb = la_isnan(b);
        if (na != nb) return na;
        if (na || a == b) return pa < pb;
        return a > b;
    }
    __device__ __forceinline__ static void add(State& s, float v, la_i64 pos) {
        const float a = fabsf(v);
        const int p = static_cast<int>(pos);
        if (better(a, p, s.amax, s.pos)) {
            s.amax = a;
            s.pos = p;
        }
        s.sum += v;
    }
    __device__ __forceinline__ static State combine(State a, State b) {
        State r;
        const bool take_a = better(a.amax, a.pos, b.amax, b.pos);
        r.amax = take_a ? a.amax : b.amax;
        r.pos = take_a ? a.pos : b.pos;
        r.sum = a.sum + b.sum;
        return r;
    }
    __device__ __forceinline__ static State shfl_xor(State s, int m) {
        State r;
        r.amax = __shfl_xor_sync(LA_FULL_MASK, s.amax, m);
        r.pos = __shfl_xor_sync(LA_FULL_MASK, s.pos, m);
        r.sum = __shfl_xor_sync(LA_FULL_MASK, s.sum, m);
        return r;
    }
    __device__ __forceinline__ static void finish(void* out0, void* out1, la_i64 i, State s, int) {
        static_cast<la_i64*>(out0)[i] = s.pos == 0x7fffffff ? 0 : s.pos;
        static_cast<float*>(out1)[i] = s.sum;
    }
};

// --- Scheme 1: contiguous rows ----------------------------------------------------------
// x holds `rows` rows of `len` contiguous values (NCHW planes; a sample of any tensor).
// A row is split into `chunks` pieces. A group of `group` lanes (a power of two <= 32, chosen
// by the host so each lane gets a handful of loads) reduces one (row, piece) at a time, so a
// warp works on 32 / group short rows at once instead of waiting on one; four loads are in
// flight per lane (16-byte vectors where the rows allow them). With chunks == 1 the group
// writes the row's result; else its partial state goes to partial[row * chunks + piece].
template <class Op>
__device__ __forceinline__ typename Op::State la_group_reduce(typename Op::State s, int group) {
    for (int m = group / 2; m > 0; m >>= 1) s = Op::combine(s, Op::shfl_xor(s, m));
    return s;
}

template <class Op, class T>
__device__ __forceinline__ void la_rows_reduce(const T* __restrict__ x, la_i64 rows, la_i64 len, int chunks,
                                               int group, typename Op::State* __restrict__ partial, void* out0,
                                               void* out1, int flag) {
    typedef typename Op::State State;
    constexpr int V = LaVec<T>::N;
    const int lane = threadIdx.x % LA_WARP;
    const int glane = lane % group;
    const int groups_per_warp = LA_WARP / group;
    const la_i64 warp = (static_cast<la_i64>(blockIdx.x) * blockDim.x + threadIdx.x) / LA_WARP;
    const la_i64 nwarps = static_cast<la_i64>(gridDim.x) * blockDim.x / LA_WARP;
    const bool vec = (len % V == 0) && la_aligned16(x);
    const int width = vec ? V : 1;
    const la_i64 step = static_cast<la_i64>(group) * width;
    la_i64 piece_len = (len + chunks - 1) / chunks;
    if (vec) piece_len = (piece_len + V - 1) / V * V;  // pieces start on vector boundaries
    const la_i64 items = rows * chunks;
    // Rounds over the items, the same count for every lane: the shuffles need the whole warp.
    for (la_i64 base = warp * groups_per_warp; base < items; base += nwarps * groups_per_warp) {
        const la_i64 item = base + lane / group;
        State s = Op::init();
        la_i64 row = 0;
        if (item < items) {
            row = item / chunks;
            const int piece = static_cast<int>(item - row * chunks);
            const la_i64 lo = piece * piece_len;
            const la_i64 hi = min(len, lo + piece_len);
            const T* p = x + row * len;
            la_i64 i = lo + glane * width;
            if (vec) {
                for (; i + 3 * step < hi; i += 4 * step) {
                    float v[4][V];
#pragma unroll
                    for (int u = 0; u < 4; ++u) la_load_vec(p + i + u * step, v[u]);
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
#pragma unroll
                        for (int j = 0; j < V; ++j) Op::add(s, v[u][j], i + u * step + j);
                    }
                }
                for (; i < hi; i += step) {
                    float v[V];
                    la_load_vec(p + i, v);
#pragma unroll
                    for (int j = 0; j < V; ++j) Op::add(s, v[j], i + j);
                }
            } else {
                for (; i + 3 * step < hi; i += 4 * step) {
                    float v[4];
#pragma unroll
                    for (int u = 0; u < 4; ++u) v[u] = la_to_float(p[i + u * step]);
#pragma unroll
                    for (int u = 0; u < 4; ++u) Op::add(s, v[u], i + u * step);
                }
                for (; i < hi; i += step) Op::add(s, la_to_float(p[i]), i);
            }
        }
        s = la_group_reduce<Op>(s, group);
        if (glane == 0 && item < items) {
            if (chunks == 1) {
                Op::finish(out0, out1, row, s, flag);
            } else {
                partial[item] = s;
            }
        }
    }
}

// --- Scheme 2: channels innermost -------------------------------------------------------
// x is (n, len, c) with c contiguous (channels-last planes; a 2-d (n, c) tensor has len 1);
// the planes are (sample, channel) and reduce over len. threadIdx.x walks channel vectors,
// threadIdx.y positions, so a warp reads whole rows of channels; blockIdx.y walks
// (sample, piece). Results go to index sample * c + channel (or to
// partial[(sample * chunks + piece) * c + channel]).
template <class Op, class T>
__device__ __forceinline__ void la_cols_reduce(const T* __restrict__ x, la_i64 n, la_i64 len, la_i64 c, int chunks,
                                               typename Op::State* __restrict__ partial, void* out0, void* out1,
                                               int flag) {
    typedef typename Op::State State;
    constexpr int V = LaVec<T>::N;
    // One State per (thread, vector lane): at most LA_THREADS * 8 of them.
    __shared__ State smem[LA_THREADS * 8];
    const bool vec = (c % V == 0) && la_aligned16(x);
    const int width = vec ? V : 1;
    const la_i64 cvecs = c / width;  // channel groups of `width` channels
    const la_i64 cv = static_cast<la_i64>(blockIdx.x) * blockDim.x + threadIdx.x;
    const la_i64 piece_len = (len + chunks - 1) / chunks;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    for (la_i64 item = blockIdx.y; item < n * chunks; item += gridDim.y) {
        const la_i64 sample = item / chunks;
        const int piece = static_cast<int>(item - sample * chunks);
        const la_i64 lo = piece * piece_len;
        const la_i64 hi = min(len, lo + piece_len);
        State s[V];
#pragma unroll
        for (int j = 0; j < V; ++j) s[j] = Op::init();
        if (cv < cvecs) {
            const T* p = x + sample * len * c + cv * width;
            const la_i64 step = blockDim.y;
            la_i64 pos = lo + threadIdx.y;
            if (vec) {
                // Two 16-byte loads in flight per thread.
                for (; pos + step < hi; pos += 2 * step) {
                    float v0[V], v1[V];
                    la_load_vec(p + pos * c, v0);
                    la_load_vec(p + (pos + step) * c, v1);
#pragma unroll
                    for (int j = 0; j < V; ++j) {
                        Op::add(s[j], v0[j], pos);
                        Op::add(s[j], v1[j], pos + step);
                    }
                }
                for (; pos < hi; pos += step) {
                    float v[V];
                    la_load_vec(p + pos * c, v);
#pragma unroll
                    for (int j = 0; j < V; ++j) Op::add(s[j], v[j], pos);
                }
            } else {
                for (; pos < hi; pos += step) Op::add(s[0], la_to_float(p[pos * c]), pos);
            }
        }
        // Tree over threadIdx.y (blockDim.y is a power of two).
        __syncthreads();
#pragma unroll
        for (int j = 0; j < V; ++j) smem[tid * V + j] = s[j];
        __syncthreads();
        for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
            if (threadIdx.y < stride) {
                const int other = tid + stride * blockDim.x;
#pragma unroll
                for (int j = 0; j < V; ++j) smem[tid * V + j] = Op::combine(smem[tid * V + j], smem[other * V + j]);
            }
            __syncthreads();
        }
        if (threadIdx.y == 0 && cv < cvecs) {
            for (int j = 0; j < width; ++j) {
                const la_i64 ch = cv * width + j;
                const State r = smem[threadIdx.x * V + j];
                if (chunks == 1) {
                    Op::finish(out0, out1, sample * c + ch, r, flag);
                } else {
                    partial[item * c + ch] = r;
                }
            }
        }
    }
}

// Combines the pieces: partial[(o * chunks + k) * inner + i] over k -> result o * inner + i.
// Fixed order over k, so the result does not depend on the launch.
template <class Op>
__device__ __forceinline__ void la_finalize(const typename Op::State* __restrict__ partial, la_i64 outer, int chunks,
                                            la_i64 inner, void* out0, void* out1, int flag) {
    const la_i64 total = outer * inner;
    for (la_i64 t = static_cast<la_i64>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
         t += static_cast<la_i64>(gridDim.x) * blockDim.x) {
        const la_i64 o = t / inner;
        const la_i64 i = t - o * inner;
        typename Op::State s = partial[o * chunks * inner + i];
        for (int k = 1; k < chunks; ++k) s = Op::combine(s, partial[(o * chunks + k) * inner + i]);
        Op::finish(out0, out1, t, s, flag);
    }
}

// Declares the three kernels of one plane operator for one dtype:
//   la_<name>_rows_<suffix>, la_<name>_cols_<suffix>; la_<name>_finalize once per operator.
#define LA_PLANE_KERNELS(name, Op, T, suffix)                                                              \
    extern "C" __global__ void                                               \
        la_##name##_rows_##suffix(const T* x, la_i64 rows, la_i64 len, int chunks, int group, void* partial, \
                                  void* out0, void* out1, int flag) {                                      \
        la_rows_reduce<Op, T>(x, rows, len, chunks, group, static_cast<Op::State*>(partial), out0, out1, flag); \
    }                                                                                                      \
    extern "C" __global__ void                                               \
        la_##name##_cols_##suffix(const T* x, la_i64 n, la_i64 len, la_i64 c, int chunks, void* partial,    \
                                  void* out0, void* out1, int flag) {                                      \
        la_cols_reduce<Op, T>(x, n, len, c, chunks, static_cast<Op::State*>(partial), out0, out1, flag);    \
    }

#define LA_FINALIZE_KERNEL(name, Op)                                                                       \
    extern "C" __global__ void                                               \
        la_##name##_finalize(const void* partial, la_i64 outer, int chunks, la_i64 inner, void* out0,      \
                             void* out1, int flag) {                                                       \
        la_finalize<Op>(static_cast<const Op::State*>(partial), outer, chunks, inner, out0, out1, flag);   \
    }

// Instantiates `X(type, suffix)` for every supported dtype.
#define LA_FOR_EACH_DTYPE(X) X(float, f32) X(la_half, f16) X(la_bf16, bf16)

// ---------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC 2011): counter-based, so every element draws its own
// numbers from (seed, element index) with no state to carry between threads or launches.
// ---------------------------------------------------------------------------------------
struct LaPhilox {
    unsigned int v[4];
};

__device__ __forceinline__ LaPhilox la_philox(la_u64 seed, la_u64 counter_lo, la_u64 counter_hi) {
    unsigned int k0 = static_cast<unsigned int>(seed), k1 = static_cast<unsigned int>(seed >> 32);
    unsigned int c0 = static_cast<unsigned int>(counter_lo), c1 = static_cast<unsigned int>(counter_lo >> 32);
    unsigned int c2 = static_cast<unsigned int>(counter_hi), c3 = static_cast<unsigned int>(counter_hi >> 32);
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const unsigned int hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const unsigned int hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        const unsigned int n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0;
        c1 = n1;
        c2 = n2;
        c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    LaPhilox r;
    r.v[0] = c0;
    r.v[1] = c1;
    r.v[2] = c2;
    r.v[3] = c3;
    return r;
}

// Uniform float in [0, 1) from the top 24 bits (every value exactly representable).
__device__ __forceinline__ float la_uniform(unsigned int bits) {
    return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

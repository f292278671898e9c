// A CPU emulator of the CUDA features the kernels in cuda_src/ use, for testing them without
// a GPU. Every CUDA thread of a block is a fiber (ucontext) running the kernel body; fibers
// switch only at __syncthreads and at warp collectives (shuffles, ballots, __syncwarp), so
// the emulated block runs with the same synchronisation semantics as a real one (one block
// at a time; atomics are plain read-modify-writes, since fibers never interleave inside one).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
struct uint4 {
    unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }

namespace emu {

enum State { READY, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

struct Fiber {
    ucontext_t ctx;
    dim3 tid;
    int linear = 0;
    State state = READY;
    std::vector<char> stack;
};

inline dim3 grid_dim, block_dim, block_idx;
inline std::vector<Fiber> fibers;
inline Fiber* cur = nullptr;
inline ucontext_t scheduler;
inline std::function<void()> body;
// Warp collectives: the value each lane deposits, and the snapshot lanes read after release.
inline std::vector<uint64_t> deposit, snapshot;
inline std::vector<int> deposit_int, snapshot_int;

inline void entry() {
    body();
    cur->state = DONE;
    swapcontext(&cur->ctx, &scheduler);
}

inline void yield(State s) {
    cur->state = s;
    swapcontext(&cur->ctx, &scheduler);
}

inline void run_block() {
    const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
    fibers.resize(n);
    deposit.assign(n, 0);
    snapshot.assign(n, 0);
    for (int i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
        f.linear = i;
        f.tid.x = i % block_dim.x;
        f.tid.y = (i / block_dim.x) % block_dim.y;
        f.tid.z = i / (block_dim.x * block_dim.y);
        f.state = READY;
        if (f.stack.empty()) f.stack.resize(1 << 16);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, entry, 0);
    }
    const int warps = (n + 31) / 32;
    for (;;) {
        for (int i = 0; i < n; ++i) {
            if (fibers[i].state != READY) continue;
            cur = &fibers[i];
            swapcontext(&scheduler, &fibers[i].ctx);
        }
        bool released = false, all_done = true;
        for (int w = 0; w < warps; ++w) {  // a warp whose live lanes all wait at a collective
            bool any = false, all = true;
            for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i) {
                if (fibers[i].state == DONE) continue;
                any = true;
                all = all && fibers[i].state == AT_WARP_BARRIER;
            }
            if (any && all) {
                for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i) {
                    snapshot[i] = deposit[i];
                    if (fibers[i].state != DONE) fibers[i].state = READY;
                }
                released = true;
            }
        }
        if (released) continue;
        bool barrier = true;
        for (int i = 0; i < n; ++i) {
            if (fibers[i].state != DONE) all_done = false;
            if (fibers[i].state == READY || fibers[i].state == AT_WARP_BARRIER) barrier = false;
        }
        if (all_done) return;
        if (barrier) {  // every live thread reached __syncthreads
            for (int i = 0; i < n; ++i)
                if (fibers[i].state == AT_BLOCK_BARRIER) fibers[i].state = READY;
            continue;
        }
        throw std::runtime_error("emulated kernel deadlocked (divergent __syncthreads or warp collective)");
    }
}

inline void launch(dim3 grid, dim3 block, std::function<void()> kernel) {
    grid_dim = grid;
    block_dim = block;
    body = std::move(kernel);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                block_idx.x = x;
                block_idx.y = y;
                block_idx.z = z;
                run_block();
            }
}

template <class V>
inline uint64_t to_bits(V v) {
    static_assert(sizeof(V) <= 8, "warp values are at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(V));
    return b;
}
template <class V>
inline V from_bits(uint64_t b) {
    V v;
    std::memcpy(&v, &b, sizeof(V));
    return v;
}
inline int lane() { return cur->linear % 32; }
inline int warp_base() { return cur->linear - lane(); }

template <class V>
inline V exchange(V v, int src_lane) {
    deposit[cur->linear] = to_bits(v);
    yield(AT_WARP_BARRIER);
    return from_bits<V>(snapshot[warp_base() + src_lane]);
}

}  // namespace emu

#define threadIdx (emu::cur->tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

inline void __syncthreads() { emu::yield(emu::AT_BLOCK_BARRIER); }
inline void __syncwarp(unsigned int = 0xffffffffu) { emu::exchange(0, 0); }

template <class V>
inline V __shfl_xor_sync(unsigned int, V v, int mask) {
    return emu::exchange(v, emu::lane() ^ mask);
}
template <class V>
inline V __shfl_up_sync(unsigned int, V v, unsigned int delta) {
    const int l = emu::lane();
    return emu::exchange(v, l >= static_cast<int>(delta) ? l - static_cast<int>(delta) : l);
}
template <class V>
inline V __shfl_sync(unsigned int, V v, int src) {
    return emu::exchange(v, src);
}
inline unsigned int __ballot_sync(unsigned int, int pred) {
    emu::deposit[emu::cur->linear] = pred ? 1 : 0;
    emu::yield(emu::AT_WARP_BARRIER);
    unsigned int bits = 0;
    const int base = emu::warp_base();
    for (int l = 0; l < 32 && base + l < static_cast<int>(emu::fibers.size()); ++l)
        if (emu::snapshot[base + l]) bits |= 1u << l;
    return bits;
}

inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return static_cast<unsigned int>((static_cast<uint64_t>(a) * b) >> 32);
}
inline float __uint_as_float(unsigned int u) { return emu::from_bits<float>(u); }
inline float __int_as_float(int i) { return emu::from_bits<float>(static_cast<unsigned int>(i)); }
inline unsigned int __float_as_uint(float f) { return static_cast<unsigned int>(emu::to_bits(f)); }

template <class V>
inline V atomicAdd(V* p, V v) {
    const V old = *p;
    *p = old + v;
    return old;
}
template <class A, class B>
inline A min(A a, B b) {
    return b < a ? static_cast<A>(b) : a;
}
template <class A, class B>
inline A max(A a, B b) {
    return a < b ? static_cast<A>(b) : a;
}

// The Metal emulator's execution model: a grid of threadgroups, each run as cooperatively
// scheduled fibers (one per GPU thread, 32-wide simdgroups), and bounds-checked buffers.
// Plain C++ (no MSL macros): included by the prelude and by host code that launches kernels.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace orchard_emu {

inline constexpr int kSimdWidth = 32;

// What a kernel did wrong (barrier divergence, out-of-bounds access, ...), thrown by dispatch()
// after the grid stops; the message names the kernel, the threadgroup, the thread and the line.
class KernelError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

struct uint3 {
    unsigned x = 0, y = 0, z = 0;
};

// A buffer as the kernel sees it: a name for messages and the bytes it may touch.
struct Buffer {
    std::string name;
    const char* lo = nullptr;
    const char* hi = nullptr;  // one past the last accessible byte
};

// Records an out-of-bounds access and returns harmless scratch memory for it to use, so the
// kernel runs on and every bad access of the launch is reported (as a KernelError at its end).
void* report_out_of_bounds(const Buffer* buffer, const char* address, size_t bytes);

// A `device T*` / `threadgroup T*` of the kernels (the build rewrites those declarations to
// this type): arithmetic as a pointer's, every dereference checked against its Buffer. The
// offset is kept as an integer so that a pointer past the end may exist (as on the GPU)
// without C++ undefined behaviour; only accesses are checked.
template <class T>
class checked_ptr {
public:
    checked_ptr() = default;
    checked_ptr(T* base, const Buffer* buffer) : base_(base), buffer_(buffer) {}
    template <class U>
        requires std::is_convertible_v<U*, T*>
    checked_ptr(const checked_ptr<U>& o) : base_(o.base_), off_(o.off_), buffer_(o.buffer_) {}

    T& operator*() const { return at(0); }
    T& operator[](int64_t i) const { return at(i); }
    T* operator->() const { return &at(0); }
    checked_ptr operator+(int64_t n) const { return moved(n); }
    checked_ptr operator-(int64_t n) const { return moved(-n); }
    checked_ptr& operator+=(int64_t n) { off_ += n; return *this; }
    checked_ptr& operator-=(int64_t n) { off_ -= n; return *this; }

private:
    template <class U>
    friend class checked_ptr;

    checked_ptr moved(int64_t n) const {
        checked_ptr r = *this;
        r.off_ += n;
        return r;
    }
    T& at(int64_t i) const {
        const auto base = reinterpret_cast<uintptr_t>(base_);
        const auto addr = base + uintptr_t((off_ + i) * int64_t(sizeof(T)));
        if (buffer_ == nullptr || addr < reinterpret_cast<uintptr_t>(buffer_->lo) ||
            addr + sizeof(T) > reinterpret_cast<uintptr_t>(buffer_->hi))
            return *static_cast<T*>(report_out_of_bounds(
                buffer_, reinterpret_cast<const char*>(addr), sizeof(T)));
        return *reinterpret_cast<T*>(addr);
    }

    T* base_ = nullptr;
    int64_t off_ = 0;  // in elements
    const Buffer* buffer_ = nullptr;
};

// The built-in ids of one GPU thread.
struct ThreadIds {
    uint3 tgid;            // threadgroup_position_in_grid
    unsigned tid;          // thread_index_in_threadgroup
    unsigned short sg;     // simdgroup_index_in_threadgroup
    unsigned short lane;   // thread_index_in_simdgroup
};

struct Launch {
    std::string kernel;      // for messages
    uint3 grid;              // threadgroups per dimension
    unsigned threads = 0;    // per threadgroup, a multiple of 32
    // Threadgroup memory passed as the kernel's [[threadgroup(0)]] argument (`smem` below),
    // filled with NaN for each threadgroup. Arrays declared in the kernel need none of this.
    size_t threadgroup_floats = 0;
};

// Runs body once per thread of every threadgroup (threadgroups one after another; the threads
// of one threadgroup as fibers that switch at barriers and simd operations). `smem` is the
// threadgroup's memory. Throws KernelError after the first failing threadgroup.
using KernelBody = std::function<void(const ThreadIds& ids, checked_ptr<float> smem)>;
void dispatch(const Launch& launch, const KernelBody& body);

// --- Called by the prelude's MSL built-ins, from inside a kernel ------------------------------

// The calling fiber's lane (thread_index_in_simdgroup).
unsigned current_lane();
// threadgroup_barrier: every thread of the threadgroup must reach the same call.
void threadgroup_barrier(std::source_location where);
// A simdgroup-wide rendezvous (simdgroup_barrier and every simd_* exchange): all 32 lanes of
// the simdgroup must reach the same call. `value` is published to the other lanes; the
// returned array holds all 32 lanes' values (valid until this lane's next exchange).
const uint64_t* simd_exchange(uint64_t value, std::source_location where);

// A `threadgroup T name[n];` declared in a kernel: the k-th such declaration a thread executes
// is the threadgroup's k-th array (created, filled with NaN bytes, by the first thread there).
void* threadgroup_alloc(size_t bytes, const Buffer** buffer);
template <class T>
checked_ptr<T> threadgroup_array(size_t n) {
    const Buffer* buffer = nullptr;
    T* data = static_cast<T*>(threadgroup_alloc(n * sizeof(T), &buffer));
    return checked_ptr<T>(data, buffer);
}

template <class T>
uint64_t to_bits(T x) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
    uint64_t u = 0;
    std::memcpy(&u, &x, sizeof(T));
    return u;
}
template <class T>
T from_bits(uint64_t u) {
    T x;
    std::memcpy(&x, &u, sizeof(T));
    return x;
}

}  // namespace orchard_emu

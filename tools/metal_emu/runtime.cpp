// The Metal emulator's scheduler: each threadgroup's threads are fibers switched at barriers
// and simd exchanges; divergence and out-of-bounds accesses become KernelErrors.
#include "metal_emu/runtime.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <limits>
#include <memory>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define ORCHARD_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ORCHARD_EMU_ASAN 1
#endif
#endif

#if defined(ORCHARD_EMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace orchard_emu {
namespace {

// Fiber stacks: the kernels keep up to 128 simdgroup matrices (64 floats each, every lane
// holds a whole copy) plus sanitizer redzones; 512 KiB is ample and only touched pages count.
constexpr size_t kStackBytes = size_t(512) << 10;
constexpr int kMaxReports = 8;

// AddressSanitizer must be told about every stack switch (its fake stacks and shadow memory
// follow the running stack).
void start_switch(void** fake_stack, const void* bottom, size_t size) {
#if defined(ORCHARD_EMU_ASAN)
    __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#else
    (void)fake_stack, (void)bottom, (void)size;
#endif
}
void finish_switch(void* fake_stack, const void** bottom, size_t* size) {
#if defined(ORCHARD_EMU_ASAN)
    __sanitizer_finish_switch_fiber(fake_stack, bottom, size);
#else
    (void)fake_stack, (void)bottom, (void)size;
#endif
}

// Fiber contexts. On x86-64 a hand-written switch: glibc's swapcontext makes a sigprocmask
// system call per switch, and AddressSanitizer's interceptor of it clears the shadow of the
// whole target stack (mmap + madvise) each time, which made the emulated tests ~25x slower
// under ASan. Elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void orchard_emu_switch(void** save_sp, void* new_sp);
// Saves the callee-saved registers on the current stack and its pointer to *save_sp, then
// restores those of new_sp and returns into it (System V AMD64 ABI).
asm(R"(
    .text
    .globl orchard_emu_switch
    .hidden orchard_emu_switch
    .type orchard_emu_switch, @function
orchard_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size orchard_emu_switch, .-orchard_emu_switch
)");

struct Context {
    void* sp = nullptr;
};

// A context that starts `entry` (which must never return) on the stack [stack, stack + size).
void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
    const uintptr_t top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
    void** frame = reinterpret_cast<void**>(top - 16);
    frame[0] = reinterpret_cast<void*>(entry);  // popped by `ret`: entry then sees rsp = 8 mod 16
    frame[1] = nullptr;                         // entry's return address (it never returns)
    void** regs = frame - 6;                    // r15 r14 r13 r12 rbx rbp
    for (int i = 0; i < 6; ++i) regs[i] = nullptr;
    c.sp = regs;
}
void switch_context(Context& from, Context& to) { orchard_emu_switch(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
};
void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

enum class State { runnable, at_barrier, at_simd, done };

struct Fiber {
    Context context;
    State state = State::runnable;
    std::source_location where;  // of the barrier / simd exchange it waits at
    void* fake_stack = nullptr;
    char* stack = nullptr;
    unsigned simd_seq = 0;  // exchanges done, selecting one of two slot sets
    size_t arrays = 0;      // threadgroup arrays declared so far
};

// A threadgroup array declared in the kernel (threadgroup_alloc).
struct Array {
    std::vector<float> data;  // floats: aligned for every MSL scalar the kernels use
    size_t bytes = 0;
    Buffer buffer;
};

// Stacks reused by every threadgroup this OS thread runs (mmap: untouched pages cost nothing).
struct StackPool {
    std::vector<char*> stacks;
    char* get(size_t i) {
        while (stacks.size() <= i) {
            void* m = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) throw KernelError("metal emulator: cannot map a fiber stack");
            stacks.push_back(static_cast<char*>(m));
        }
        return stacks[i];
    }
    ~StackPool() {
        for (char* s : stacks) munmap(s, kStackBytes);
    }
};

// One threadgroup in flight on this OS thread.
struct Group {
    const Launch* launch = nullptr;
    const KernelBody* body = nullptr;
    uint3 tgid;
    std::vector<Fiber> fibers;
    std::vector<uint64_t> slots;  // simd exchange values: [2][simdgroups][32]
    checked_ptr<float> smem;
    std::vector<std::unique_ptr<Array>> arrays;  // stable addresses: Buffers are referenced
    Context scheduler;
    const void* scheduler_stack = nullptr;
    size_t scheduler_stack_size = 0;
    int current = -1;
    std::vector<std::string>* reports = nullptr;
};

thread_local Group* g_group = nullptr;
thread_local StackPool g_stacks;
alignas(64) thread_local unsigned char g_sink[64];  // where out-of-bounds accesses land

std::string where_str(const std::source_location& w) {
    std::ostringstream os;
    const std::string file = w.file_name();
    os << file.substr(file.find_last_of('/') + 1) << ":" << w.line();
    return os.str();
}

std::string group_str(const Group& g) {
    std::ostringstream os;
    os << "kernel " << g.launch->kernel << ", threadgroup (" << g.tgid.x << ", " << g.tgid.y
       << ", " << g.tgid.z << ")";
    return os.str();
}

void report(Group& g, const std::string& what) {
    if (int(g.reports->size()) < kMaxReports) g.reports->push_back(group_str(g) + ": " + what);
}

// Back to the scheduler from the running fiber.
void yield_to_scheduler() {
    Group& g = *g_group;
    Fiber& f = g.fibers[g.current];
    start_switch(&f.fake_stack, g.scheduler_stack, g.scheduler_stack_size);
    switch_context(f.context, g.scheduler);
    finish_switch(f.fake_stack, &g.scheduler_stack, &g.scheduler_stack_size);
}

void fiber_main() {
    Group& g = *g_group;
    finish_switch(nullptr, &g.scheduler_stack, &g.scheduler_stack_size);
    const int t = g.current;
    ThreadIds ids;
    ids.tgid = g.tgid;
    ids.tid = unsigned(t);
    ids.sg = static_cast<unsigned short>(t / kSimdWidth);
    ids.lane = static_cast<unsigned short>(t % kSimdWidth);
    try {
        (*g.body)(ids, g.smem);
    } catch (const std::exception& e) {
        report(g, std::string("thread ") + std::to_string(t) + " threw: " + e.what());
    }
    g.fibers[t].state = State::done;
    start_switch(nullptr, g.scheduler_stack, g.scheduler_stack_size);  // this stack is done
    switch_context(g.fibers[t].context, g.scheduler);
}

void resume(Group& g, int t) {
    g.current = t;
    Fiber& f = g.fibers[t];
    void* fake = nullptr;
    start_switch(&fake, f.stack, kStackBytes);
    switch_context(g.scheduler, f.context);
    finish_switch(fake, nullptr, nullptr);
    g.current = -1;
}

// "lanes 0-3, 7 at X" style summary of which threads wait where.
std::string states_str(const Group& g, int first, int count) {
    std::ostringstream os;
    const char* sep = "";
    for (int t = first; t < first + count; ++t) {
        const Fiber& f = g.fibers[t];
        os << sep << "thread " << t << ": ";
        switch (f.state) {
            case State::done: os << "exited"; break;
            case State::at_barrier: os << "threadgroup_barrier at " << where_str(f.where); break;
            case State::at_simd: os << "simdgroup operation at " << where_str(f.where); break;
            case State::runnable: os << "running"; break;
        }
        sep = "; ";
        // Print one representative per run of equal states.
        while (t + 1 < first + count && g.fibers[t + 1].state == f.state &&
               (f.state == State::done || g.fibers[t + 1].where.line() == f.where.line()))
            ++t;
    }
    return os.str();
}

bool same_place(const Fiber& a, const Fiber& b) {
    return a.where.line() == b.where.line() && a.where.column() == b.where.column() &&
           std::string_view(a.where.file_name()) == b.where.file_name();
}

// Releases every simdgroup whose 32 lanes wait at the same exchange; reports a simdgroup whose
// lanes wait at different ones or partly exited. Returns whether any fiber became runnable.
bool release_simdgroups(Group& g, bool& failed) {
    bool released = false;
    const int n_sg = int(g.fibers.size()) / kSimdWidth;
    for (int s = 0; s < n_sg; ++s) {
        Fiber* lanes = &g.fibers[s * kSimdWidth];
        int at_simd = 0, done = 0;
        for (int l = 0; l < kSimdWidth; ++l) {
            at_simd += lanes[l].state == State::at_simd;
            done += lanes[l].state == State::done;
        }
        if (at_simd == 0) continue;
        bool same = true;
        for (int l = 0; l < kSimdWidth; ++l)
            if (lanes[l].state == State::at_simd && !same_place(lanes[l], lanes[0])) same = false;
        if (at_simd == kSimdWidth && same) {
            for (int l = 0; l < kSimdWidth; ++l) lanes[l].state = State::runnable;
            released = true;
        } else if (at_simd + done == kSimdWidth || !same) {
            report(g, "simdgroup divergence in simdgroup " + std::to_string(s) + ": " +
                          states_str(g, s * kSimdWidth, kSimdWidth));
            failed = true;
        }
    }
    return released;
}

// Releases the threadgroup barrier when every thread waits at the same one.
bool release_barrier(Group& g, bool& failed) {
    int at_barrier = 0;
    for (const Fiber& f : g.fibers) at_barrier += f.state == State::at_barrier;
    if (at_barrier == 0) return false;
    bool same = true;
    const Fiber* first = nullptr;
    for (const Fiber& f : g.fibers) {
        if (f.state != State::at_barrier) continue;
        if (first == nullptr) first = &f;
        if (!same_place(f, *first)) same = false;
    }
    if (at_barrier == int(g.fibers.size()) && same) {
        for (Fiber& f : g.fibers) f.state = State::runnable;
        return true;
    }
    report(g, "threadgroup barrier divergence: " + states_str(g, 0, int(g.fibers.size())));
    failed = true;
    return false;
}

// A fiber stopped mid-kernel (divergence) leaves AddressSanitizer's poison on its stack; the
// next fiber there must start clean. (A finished one does not: its frames have returned, and
// each new frame rewrites the poison of the addresses it covers.)
void unpoison_abandoned(Group& g) {
#if defined(ORCHARD_EMU_ASAN)
    for (Fiber& f : g.fibers)
        if (f.state != State::done) ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#else
    (void)g;
#endif
}

// Runs one threadgroup to completion (or to the first divergence).
void run_group(Group& g) {
    const int n = int(g.fibers.size());
    for (int t = 0; t < n; ++t) {
        Fiber& f = g.fibers[t];
        f = Fiber{};
        f.stack = g_stacks.get(size_t(t));
        make_context(f.context, f.stack, kStackBytes, fiber_main);
    }
    for (;;) {
        bool ran = false;
        for (int t = 0; t < n; ++t)
            if (g.fibers[t].state == State::runnable) {
                resume(g, t);
                ran = true;
            }
        bool all_done = true;
        for (const Fiber& f : g.fibers) all_done = all_done && f.state == State::done;
        if (all_done) return;
        bool failed = false;
        const bool released = release_simdgroups(g, failed);
        if (failed) return unpoison_abandoned(g);
        if (released || ran) continue;
        // Nobody can run and no simdgroup could be released: the threadgroup barrier, or a
        // deadlock between barrier and simdgroup operations.
        if (release_barrier(g, failed)) continue;
        if (!failed)
            report(g, "deadlock: " + states_str(g, 0, n));
        return unpoison_abandoned(g);
    }
}

}  // namespace

void* report_out_of_bounds(const Buffer* buffer, const char* address, size_t bytes) {
    Group* g = g_group;
    std::ostringstream os;
    if (buffer == nullptr) {
        os << "access of " << bytes << " bytes through a null / unbound pointer";
    } else {
        const auto lo = reinterpret_cast<uintptr_t>(buffer->lo);
        const auto a = reinterpret_cast<uintptr_t>(address);
        os << "out-of-bounds access to buffer '" << buffer->name << "': " << bytes
           << " bytes at byte offset " << (a >= lo ? "" : "-") << (a >= lo ? a - lo : lo - a)
           << ", buffer has " << (buffer->hi - buffer->lo) << " bytes";
    }
    if (g != nullptr && g->current >= 0) {
        os << " (thread " << g->current << ")";
        report(*g, os.str());
    } else {
        throw KernelError("metal emulator: " + os.str());
    }
    std::memset(g_sink, 0, sizeof g_sink);
    return g_sink;
}

void* threadgroup_alloc(size_t bytes, const Buffer** buffer) {
    Group& g = *g_group;
    Fiber& f = g.fibers[g.current];
    const size_t k = f.arrays++;
    if (k == g.arrays.size()) {
        auto a = std::make_unique<Array>();
        a->data.assign((bytes + sizeof(float) - 1) / sizeof(float),
                       std::numeric_limits<float>::quiet_NaN());  // undefined on the GPU
        a->bytes = bytes;
        const char* lo = reinterpret_cast<const char*>(a->data.data());
        a->buffer = {"threadgroup array " + std::to_string(k), lo, lo + bytes};
        g.arrays.push_back(std::move(a));
    }
    Array& a = *g.arrays[k];
    if (a.bytes != bytes)
        report(g, "thread " + std::to_string(g.current) + " declares threadgroup array " +
                      std::to_string(k) + " with " + std::to_string(bytes) +
                      " bytes but another thread with " + std::to_string(a.bytes));
    *buffer = &a.buffer;
    return a.data.data();
}

unsigned current_lane() { return unsigned(g_group->current % kSimdWidth); }

void threadgroup_barrier(std::source_location where) {
    Fiber& f = g_group->fibers[g_group->current];
    f.state = State::at_barrier;
    f.where = where;
    yield_to_scheduler();
}

const uint64_t* simd_exchange(uint64_t value, std::source_location where) {
    Group& g = *g_group;
    const int t = g.current;
    Fiber& f = g.fibers[t];
    const int n_sg = int(g.fibers.size()) / kSimdWidth;
    // Two slot sets, alternating: a lane can be at most one exchange ahead of the slowest
    // reader, since every exchange waits for all lanes.
    uint64_t* set = g.slots.data() + size_t(f.simd_seq % 2) * n_sg * kSimdWidth +
                    size_t(t / kSimdWidth) * kSimdWidth;
    ++f.simd_seq;
    set[t % kSimdWidth] = value;
    f.state = State::at_simd;
    f.where = where;
    yield_to_scheduler();
    return set;
}

void dispatch(const Launch& launch, const KernelBody& body) {
    if (launch.threads == 0 || launch.threads % kSimdWidth != 0)
        throw KernelError("metal emulator: kernel " + launch.kernel +
                          ": threads per threadgroup must be a positive multiple of 32 but is " +
                          std::to_string(launch.threads));
    std::vector<std::string> reports;
    std::vector<float> smem(launch.threadgroup_floats);
    Buffer smem_buffer{"threadgroup memory", reinterpret_cast<const char*>(smem.data()),
                       reinterpret_cast<const char*>(smem.data() + smem.size())};
    Group g;
    g.launch = &launch;
    g.body = &body;
    g.fibers.resize(launch.threads);
    g.slots.assign(2 * size_t(launch.threads), 0);
    g.smem = checked_ptr<float>(smem.data(), &smem_buffer);
    g.reports = &reports;
    Group* outer = g_group;
    g_group = &g;
    for (unsigned z = 0; z < launch.grid.z && reports.empty(); ++z)
        for (unsigned y = 0; y < launch.grid.y && reports.empty(); ++y)
            for (unsigned x = 0; x < launch.grid.x && reports.empty(); ++x) {
                // Threadgroup memory starts undefined on the GPU: NaN makes reads of unwritten
                // memory visible in results.
                std::fill(smem.begin(), smem.end(), std::numeric_limits<float>::quiet_NaN());
                g.tgid = {x, y, z};
                g.arrays.clear();
                run_group(g);
            }
    g_group = outer;
    if (!reports.empty()) {
        std::string msg = "metal emulator: ";
        for (size_t i = 0; i < reports.size(); ++i) msg += (i ? "\n  " : "") + reports[i];
        throw KernelError(msg);
    }
}

}  // namespace orchard_emu

// Unit tests of the core's parts: Philox, dtype conversions, masks, overlap, tiles, the thread
// pool, the call log, determinism, concurrency, and the dropout mask as DESIGN.md defines it.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cases.h"
#include "core/dtype_convert.h"
#include "core/mask.h"
#include "core/memory_overlap.h"
#include "core/params.h"
#include "core/philox.h"
#include "core/thread_pool.h"
#include "cpu/simd_dispatch.h"
#include "cpu/first_touch.h"
#include "cpu/tile.h"
#include "cpu/tile_size.h"

namespace orchard::test {
namespace {

TEST(Philox, MatchesRandom123KnownAnswers) {
    // Known-answer vectors of philox4x32-10 from Random123 (kat_vectors).
    auto eq = [](Philox4 r, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
        EXPECT_EQ(r.x[0], a);
        EXPECT_EQ(r.x[1], b);
        EXPECT_EQ(r.x[2], c);
        EXPECT_EQ(r.x[3], d);
    };
    eq(philox4x32_10(0, 0, 0, 0, 0, 0), 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8);
    eq(philox4x32_10(~0u, ~0u, ~0u, ~0u, ~0u, ~0u), 0x408f276d, 0x41c83b0e, 0xa20bc7c6,
       0x6d5451fd);
    eq(philox4x32_10(0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344, 0xa4093822, 0x299f31d0),
       0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1);
}

TEST(Philox, DropoutCounterLayout) {
    // counter = (j / 4, i, b * Hq + h, offset), key = (seed low, seed high), word j % 4.
    const uint64_t seed = 0x0123456789abcdefULL;
    const Philox4 w = philox4x32_10(5, 11, 3, 9, 0x89abcdef, 0x01234567);
    for (int j = 20; j < 24; ++j)
        EXPECT_EQ(dropout_keep(seed, 9, 0x80000000u, 3, 11, j), w.x[j % 4] < 0x80000000u);
    EXPECT_EQ(dropout_keep_threshold(0.0), 0xFFFFFFFFu);
    EXPECT_EQ(dropout_keep_threshold(0.5), 0x80000000u);
    EXPECT_EQ(dropout_keep_threshold(0.25), 0xC0000000u);
}

TEST(DtypeConvert, HalfRoundTripsEveryPattern) {
    for (uint32_t bits = 0; bits < 0x10000; ++bits) {
        const half_t h{uint16_t(bits)};
        const float f = to_float(h);
        if (std::isnan(f)) {
            EXPECT_TRUE(std::isnan(to_float(to_half(f))));
        } else {
            EXPECT_EQ(to_half(f).bits, h.bits) << std::hex << bits;
        }
    }
}

TEST(DtypeConvert, RoundsToNearestEven) {
    EXPECT_EQ(to_half(1.0f + 0x1p-11f).bits, to_half(1.0f).bits);            // tie -> even
    EXPECT_EQ(to_half(1.0f + 3 * 0x1p-11f).bits, uint16_t(0x3C02));          // tie -> even (up)
    EXPECT_EQ(to_half(65504.0f).bits, uint16_t(0x7BFF));                     // max half
    EXPECT_EQ(to_half(65520.0f).bits, uint16_t(0x7C00));                     // rounds to inf
    EXPECT_EQ(to_half(0x1p-24f).bits, uint16_t(0x0001));                     // min subnormal
    EXPECT_EQ(to_half(0x1p-25f).bits, uint16_t(0x0000));                     // tie -> 0
    EXPECT_EQ(to_half(-2.0f).bits, uint16_t(0xC000));
    EXPECT_EQ(to_bf16(1.0f + 0x1p-8f).bits, to_bf16(1.0f).bits);             // tie -> even
    EXPECT_EQ(to_bf16(1.0f + 3 * 0x1p-8f).bits, uint16_t(0x3F82));
    EXPECT_TRUE(std::isnan(to_float(to_bf16(NAN))));
    EXPECT_EQ(to_bf16(3.4028235e38f).bits, uint16_t(0x7F80));  // FLT_MAX rounds to inf
    for (uint32_t bits = 0; bits < 0x10000; bits += 7) {
        const bfloat16_t b{uint16_t(bits)};
        if (!std::isnan(to_float(b))) {
            EXPECT_EQ(to_bf16(to_float(b)).bits, b.bits);
        }
    }
}

TEST(Mask, VisibleKeysAndQueriesSeeingAgree) {
    for (int64_t sq : {1, 5, 9})
        for (int64_t sk : {1, 4, 9})
            for (int64_t left : {int64_t(0), int64_t(2), kUnbounded})
                for (int64_t right : {int64_t(0), int64_t(3), kUnbounded}) {
                    const int64_t diag = sk - sq;
                    for (int64_t i = 0; i < sq; ++i)
                        for (int64_t j = 0; j < sk; ++j) {
                            const bool want = i + diag - left <= j && j <= i + diag + right;
                            const Span keys = visible_keys(i, diag, left, right, sk);
                            const Span qs = queries_seeing(j, j + 1, diag, left, right, sq);
                            EXPECT_EQ(keys.lo <= j && j < keys.hi, want);
                            EXPECT_EQ(qs.lo <= i && i < qs.hi, want);
                        }
                }
}

TEST(MemoryOverlap, InternalOverlap) {
    float buf[64];
    EXPECT_FALSE(has_internal_overlap(TensorView::contiguous(buf, DType::f32, {2, 3, 4})));
    EXPECT_TRUE(has_internal_overlap(TensorView::strided(buf, DType::f32, {2, 3}, {0, 1})));
    EXPECT_TRUE(has_internal_overlap(TensorView::strided(buf, DType::f32, {4, 4}, {2, 1})));
    EXPECT_FALSE(has_internal_overlap(TensorView::strided(buf, DType::f32, {4, 1}, {1, 0})));
    EXPECT_FALSE(has_internal_overlap(TensorView::strided(buf, DType::f32, {3, 4}, {1, 3})));
}

TEST(MemoryOverlap, PackedViewsAreDisjointSlicesAreNot) {
    std::vector<float> qkv(2 * 5 * 3 * 4 * 8);  // (B, S, 3, H, D)
    auto part = [&](int which) {
        return TensorView::strided(qkv.data() + which * 4 * 8, DType::f32, {2, 5, 4, 8},
                                   {5 * 3 * 32, 3 * 32, 8, 1});
    };
    EXPECT_FALSE(may_overlap(part(0), part(1)));
    EXPECT_FALSE(may_overlap(part(2), part(1)));
    EXPECT_TRUE(may_overlap(part(1), part(1)));
    std::vector<float> a(100), b(100);
    EXPECT_FALSE(may_overlap(TensorView::contiguous(a.data(), DType::f32, {100}),
                             TensorView::contiguous(b.data(), DType::f32, {100})));
    EXPECT_TRUE(may_overlap(TensorView::contiguous(a.data(), DType::f32, {60}),
                            TensorView::contiguous(a.data() + 50, DType::f32, {50})));
    EXPECT_FALSE(may_overlap(TensorView::contiguous(a.data(), DType::f32, {50}),
                             TensorView::contiguous(a.data() + 50, DType::f32, {50})));
}

TEST(SimdDispatch, LevelIsCappedByTheEnvironment) {
    // The ctest entries cases_simd_* run the suite with ORCHARD_CPU_SIMD set; this checks that
    // the variable took effect: it lowers the level to the one named, never above what the CPU
    // has (an AVX2-only CPU stays at avx2 under ORCHARD_CPU_SIMD=avx512).
    const char* env = std::getenv("ORCHARD_CPU_SIMD");
    if (env != nullptr) {
        const cpu::SimdLevel detected = cpu::detected_simd_level();
        bool named = false;
        for (cpu::SimdLevel l : {cpu::SimdLevel::baseline, cpu::SimdLevel::sse4, cpu::SimdLevel::avx2,
                                 cpu::SimdLevel::avx512, cpu::SimdLevel::avx512_bf16, cpu::SimdLevel::amx})
            if (std::strcmp(env, cpu::to_string(l)) == 0) {
                named = true;
                EXPECT_STREQ(cpu::to_string(cpu::simd_level()), cpu::to_string(std::min(l, detected)));
            }
        EXPECT_TRUE(named) << "ORCHARD_CPU_SIMD=" << env << " names no level";
    }
    EXPECT_STREQ(cpu::to_string(cpu::SimdLevel::avx2), "avx2");
}

// Transposed tiles' leading dims: at least n, whole vectors, never a multiple of 512 bytes, and
// at most one vector more than needed.
TEST(TileSize, TransposedLeadingDimAvoidsL1SetConflicts) {
    for (int64_t n = 1; n <= 600; ++n)
        for (int64_t m : {4, 8, 16})
            for (int64_t bytes : {2, 4, 8}) {
                const int64_t ld = cpu::transposed_ld(n, m, bytes);
                EXPECT_GE(ld, n);
                EXPECT_EQ(ld % m, 0);
                EXPECT_NE(ld * bytes % 512, 0) << "n=" << n << " m=" << m << " bytes=" << bytes;
                EXPECT_LE(ld, cpu::round_up(n, m) + m);
            }
    EXPECT_EQ(cpu::transposed_ld(256, 8, 4), 264);  // 1 KiB rows: the case that was slow
    EXPECT_EQ(cpu::transposed_ld(288, 8, 4), 288);
}

TEST(TileSize, FitsL2AndVectorWidths) {
    for (int64_t d = 1; d <= 512; d += 7)
        for (int64_t dv : {int64_t(1), d, int64_t(512)}) {
            for (const cpu::TileSize ts :
                 {cpu::tile_size(d, dv), cpu::fwd_tile_size(d, dv), cpu::bwd_tile_size(d, dv)}) {
                EXPECT_EQ(ts.block_q % 16, 0);
                EXPECT_EQ(ts.block_k % 16, 0);
                // Working set of the forward (fp32): q, k^T, v, s, acc.
                const int64_t floats = ts.block_q * d + d * ts.block_k + ts.block_k * dv +
                                       ts.block_q * ts.block_k + ts.block_q * dv;
                EXPECT_LE(floats * 4, int64_t(1) << 20) << "d=" << d << " dv=" << dv;
            }
            // The forward meets each key block in whole passes of kFwdPassQ queries.
            EXPECT_EQ(cpu::fwd_tile_size(d, dv).block_q % cpu::kFwdPassQ, 0);
            // Up to D + Dv = 256 the fp32 GEMMs' rows are whole register blocks (6 rows on
            // AVX2, 8 on AVX-512): the forward's P V product has kFwdPassQ rows, the backward's
            // products block_q or block_k.
            static_assert(cpu::kFwdPassQ % 24 == 0);
            if (d + dv <= 256) {
                EXPECT_EQ(cpu::fwd_tile_size(d, dv).block_q % 24, 0);
                EXPECT_EQ(cpu::bwd_tile_size(d, dv).block_q % 24, 0);
                EXPECT_EQ(cpu::bwd_tile_size(d, dv).block_k % 24, 0);
            }
        }
}

// fault_in maps every page of a dense tensor, keeping its contents where the OS can (else one zero
// per page); a view that is not dense is left alone.
TEST(DenseElements, FaultInMapsThePagesOfDenseTensorsOnly) {
    const int64_t B = 3, S = 100, H = 4, D = 32, n = B * S * H * D;  // 150 KiB of floats
    // Where the OS populates pages without writing, contents stay; elsewhere a zero is stored in
    // each page (first_touch.h), and the kernels write every element afterwards.
    std::vector<float> x(size_t(n), 1.f);
    cpu::fault_in<float>(x.data(), B, S, H, D, {S * H * D, H * D, D, 1});
    const auto ones = std::count(x.begin(), x.end(), 1.f);
#if defined(__linux__)
    if (madvise(reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(x.data()) & ~uintptr_t(4095)),
                4096, MADV_POPULATE_WRITE) == 0) {
        EXPECT_EQ(ones, n);
    } else
#endif
    {
        for (int64_t i = 0; i < n; ++i)
            if (x[size_t(i)] != 1.f) ASSERT_EQ(x[size_t(i)], 0.f) << i;
        EXPECT_GE(ones, n - n / 1024 - 1);
    }
#if defined(__linux__)
    // Fresh anonymous memory: mapped afterwards (mincore), and only for a dense layout.
    const size_t bytes = size_t(n) * sizeof(float), pages = (bytes + 4095) / 4096;
    auto resident = [&](void* m) {
        std::vector<unsigned char> in(pages);
        EXPECT_EQ(mincore(m, bytes, in.data()), 0);
        return std::count_if(in.begin(), in.end(), [](unsigned char c) { return c & 1; });
    };
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(m, MAP_FAILED);
    cpu::fault_in<float>(m, B, S, H, D / 2, {S * H * D, H * D, D, 1});  // half the rows: no
    EXPECT_EQ(resident(m), 0);
    cpu::fault_in<float>(m, B, S, H, D, {S * H * D, H * D, D, 1});
    EXPECT_EQ(resident(m), int64_t(pages));
    munmap(m, bytes);
#endif
}

TEST(DenseElements, OnlyLayoutsThatTileOneRangeExactly) {
    const int64_t B = 2, S = 5, H = 3, D = 4;
    EXPECT_EQ(cpu::dense_elements(B, S, H, D, {S * H * D, H * D, D, 1}), B * S * H * D);  // (B, S, H, D)
    EXPECT_EQ(cpu::dense_elements(B, S, H, D, {H * S * D, D, S * D, 1}), B * S * H * D);  // (B, H, S, D)
    EXPECT_EQ(cpu::dense_elements(B, S, H, D, {S * H * 8, H * 8, 8, 1}), 0);  // padded rows
    EXPECT_EQ(cpu::dense_elements(B, S, H, D, {S * H * D, H * D, 0, 1}), 0);  // expanded heads
    EXPECT_EQ(cpu::dense_elements(B, S, H, D, {S * H * D, H * D, D, 2}), 0);  // strided dim
    EXPECT_EQ(cpu::dense_elements(B, S, H, D, {-S * H * D, H * D, D, 1}), 0);  // negative stride
    EXPECT_EQ(cpu::dense_elements(1, S, 1, D, {123, D, 77, 1}), S * D);  // size-1 dims: any stride
    EXPECT_EQ(cpu::dense_elements(B, 0, H, D, {0, H * D, D, 1}), 0);  // empty
}

TEST(ThreadPool, RunsEveryTaskOnceAndPropagatesErrors) {
    for (int64_t n : {0, 1, 2, 3, 100, 1001}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        auto task = [&](int64_t i) { hits[size_t(i)]++; };
        parallel_for(n, task);
        for (auto& h : hits) EXPECT_EQ(h.load(), 1);
    }
    auto boom = [](int64_t i) {
        if (i == 37) throw std::runtime_error("task 37 failed");
    };
    EXPECT_THROW(parallel_for(100, boom), std::runtime_error);
    // Nested calls run inline; concurrent callers never deadlock.
    std::atomic<int64_t> sum{0};
    auto inner = [&](int64_t i) { sum += i; };
    auto outer = [&](int64_t) { parallel_for(10, inner); };
    std::vector<std::thread> callers;
    for (int t = 0; t < 4; ++t) callers.emplace_back([&] { parallel_for(8, outer); });
    for (auto& c : callers) c.join();
    EXPECT_EQ(sum.load(), 4 * 8 * 45);
}

Case fused_vs_two_pass_case();

// A framework's runner: here, one std::thread per worker.
void thread_runner(int n, void (*body)(void*, int), void* ctx) {
    std::vector<std::thread> threads;
    for (int i = 0; i < n; ++i) threads.emplace_back(body, ctx, i);
    for (auto& t : threads) t.join();
}

TEST(ThreadPool, RunsOnAFrameworksRunner) {
    const Case c = fused_vs_two_pass_case();
    Inputs in = make_inputs(c, DType::f32);
    const Result own = run_case(c, in, DType::f32, Backend::cpu);
    set_parallel_runner(&thread_runner, 3);
    EXPECT_EQ(num_threads(), 3);
    std::vector<std::atomic<int>> hits(1000);
    auto task = [&](int64_t i) { hits[size_t(i)]++; };
    parallel_for(1000, task);
    auto boom = [](int64_t i) {
        if (i == 5) throw std::runtime_error("task 5 failed");
    };
    EXPECT_THROW(parallel_for(100, boom), std::runtime_error);
    const Result lent = run_case(c, in, DType::f32, Backend::cpu);
    set_parallel_runner(nullptr, 0);
    for (auto& h : hits) EXPECT_EQ(h.load(), 1);
    EXPECT_EQ(lent.dq, own.dq);  // bitwise: the fused / two-pass choice changes nothing
    EXPECT_EQ(lent.dk, own.dk);
    EXPECT_EQ(lent.out, own.out);
}

TEST(ThreadPool, ThreadCountIsSettable) {
    const int before = num_threads();
    set_num_threads(3);
    EXPECT_EQ(num_threads(), 3);
    set_num_threads(1);
    EXPECT_EQ(num_threads(), 1);
    set_num_threads(before);
    EXPECT_EQ(num_threads(), before);
}

Case determinism_case() {
    return {.name = "det", .B = 2, .Sq = 150, .Sk = 170, .Hq = 4, .Hkv = 2, .D = 48,
            .causal = true, .dropout = 0.1};
}

// With 3 (batch, kv head) pairs the backward runs fused on 1 thread and in two passes on 2.
Case fused_vs_two_pass_case() {
    return {.name = "det3", .B = 1, .Sq = 150, .Sk = 170, .Hq = 6, .Hkv = 3, .D = 40,
            .left = 60, .right = 10, .softcap = 2.0, .alibi = 1, .dropout = 0.1};
}

// 4 query blocks of 192 per head: the fp32 forward runs them in tasks of 2 blocks on 1 thread
// (packing their keys once) and of 1 block on 2 threads (fwd_blocks_per_task).
Case forward_groups_case() {
    return {.name = "groups", .B = 1, .Sq = 700, .Sk = 730, .Hq = 2, .Hkv = 1, .D = 32,
            .left = 150, .right = 40, .dropout = 0.1};
}

// 16 (batch, kv head) pairs: the bf16-GEMM backward runs fused (fuse_dq_bf16).
Case many_kv_heads_case() {
    return {.name = "kv16", .B = 4, .Sq = 70, .Sk = 90, .Hq = 8, .Hkv = 4, .D = 40,
            .causal = true, .dropout = 0.1};
}

TEST(Backward, Bf16FusedAndTwoPassMatchTheReference) {
    // Both variants of the bf16 backward (on the bf16 GEMMs where cpu::bf16_gemms(), which the
    // ctest entry cases_bf16_gemms_vector forces) against float64.
    for (const Case& c : {fused_vs_two_pass_case(), many_kv_heads_case()}) {
        Inputs in = make_inputs(c, DType::bf16);
        const Result ref = run_reference(c, in);
        const Result got = run_case(c, in, DType::bf16, Backend::cpu);
        const double tol = 3 * tolerance(DType::bf16);
        EXPECT_LE(rel_error(got.dq, ref.dq), tol) << c.name;
        EXPECT_LE(rel_error(got.dk, ref.dk), tol) << c.name;
        EXPECT_LE(rel_error(got.dv, ref.dv), tol) << c.name;
    }
}

TEST(Determinism, BackwardIsBitwiseIdenticalAcrossRunsAndThreadCounts) {
    ASSERT_FALSE(cpu::fuse_dq(3, 2, 0, false));
    ASSERT_TRUE(cpu::fuse_dq(3, 1, 0, false));
    // bf16 runs on the bf16 GEMMs where cpu::bf16_gemms(); their backward fuses by the problem's
    // size alone (16 kv heads: fused, 3: two passes).
    ASSERT_TRUE(cpu::fuse_dq_bf16(16, 0, false));
    ASSERT_EQ(cpu::fwd_tile_size(32, 32).block_q, 192);
    ASSERT_EQ(cpu::fwd_blocks_per_task(2, 4, 1), 2);
    ASSERT_EQ(cpu::fwd_blocks_per_task(2, 4, 2), 1);
    for (DType dt : {DType::f32, DType::bf16})
        for (const Case& c : {determinism_case(), fused_vs_two_pass_case(), many_kv_heads_case(),
                              forward_groups_case()}) {
            Inputs in = make_inputs(c, dt);
            const int before = num_threads();
            set_num_threads(2);
            const Result first = run_case(c, in, dt, Backend::cpu);
            const Result again = run_case(c, in, dt, Backend::cpu);
            set_num_threads(1);
            const Result serial = run_case(c, in, dt, Backend::cpu);
            set_num_threads(before);
            for (const Result* r : {&again, &serial}) {
                EXPECT_EQ(r->out, first.out) << case_name(c, dt);
                EXPECT_EQ(r->dq, first.dq) << case_name(c, dt);
                EXPECT_EQ(r->dk, first.dk) << case_name(c, dt);
                EXPECT_EQ(r->dv, first.dv) << case_name(c, dt);
            }
        }
}

TEST(SimdDispatch, Bf16GemmsRunExactlyWhereTheLevelAllows) {
    // The ctest entries cases_simd_avx512_bf16 (AMX off) and cases_simd_avx512 (bf16 GEMMs off)
    // and cases_bf16_gemms_vector (forced on AVX512-BF16) rerun this with the kill switches set.
    const bool amx = cpu::simd_level() >= cpu::SimdLevel::amx;
    const char* force = std::getenv("ORCHARD_CPU_BF16_GEMMS");
    const bool forced = force != nullptr && std::string(force) == "1";
    EXPECT_EQ(cpu::bf16_gemms(),
              amx || (forced && cpu::simd_level() >= cpu::SimdLevel::avx512_bf16));
    const Case c{.name = "path", .B = 1, .Sq = 40, .Sk = 40, .Hq = 2, .Hkv = 2, .D = 32};
    for (DType dt : {DType::f32, DType::bf16}) {
        Inputs in = make_inputs(c, dt);
        const int64_t amx_before = cpu::bf16_gemm_calls(true), vec_before = cpu::bf16_gemm_calls(false);
        run_case(c, in, dt, Backend::cpu);  // one forward, one backward
        const int64_t want = dt == DType::bf16 && cpu::bf16_gemms() ? 2 : 0;
        EXPECT_EQ(cpu::bf16_gemm_calls(true) - amx_before, amx ? want : 0) << to_string(dt);
        EXPECT_EQ(cpu::bf16_gemm_calls(false) - vec_before, amx ? 0 : want) << to_string(dt);
    }
}

TEST(TileSize, Bf16BackwardFusesByProblemSizeOnly) {
    EXPECT_TRUE(cpu::fuse_dq_bf16(16, 1 << 20, false));
    EXPECT_FALSE(cpu::fuse_dq_bf16(15, 1 << 20, false));
    EXPECT_FALSE(cpu::fuse_dq_bf16(64, 1 << 20, true));           // varlen: uneven tasks
    EXPECT_FALSE(cpu::fuse_dq_bf16(64, int64_t(1) << 30, false));  // buffer too large
}

TEST(TileSize, ForwardTasksTakeWholeHeadsWhileThreadsStayBusy) {
    EXPECT_EQ(cpu::fwd_blocks_per_task(64, 6, 2), 6);   // 64 heads >= 4 tasks per thread
    EXPECT_EQ(cpu::fwd_blocks_per_task(8, 6, 2), 6);
    EXPECT_EQ(cpu::fwd_blocks_per_task(4, 6, 2), 3);    // 2 tasks per head
    EXPECT_EQ(cpu::fwd_blocks_per_task(3, 6, 2), 2);    // 3 tasks per head: 9 >= 8
    EXPECT_EQ(cpu::fwd_blocks_per_task(3, 7, 2), 2);    // 7 blocks in tasks of 2, 2, 2, 1
    EXPECT_EQ(cpu::fwd_blocks_per_task(1, 6, 16), 1);   // more threads than blocks
    EXPECT_EQ(cpu::fwd_blocks_per_task(64, 1, 2), 1);
    for (int64_t heads : {1, 2, 5, 64})
        for (int64_t blocks : {1, 2, 7, 40})
            for (int threads : {1, 2, 3, 16, 128}) {
                const int64_t per = cpu::fwd_blocks_per_task(heads, blocks, threads);
                ASSERT_GE(per, 1);
                ASSERT_LE(per, blocks);
                const int64_t tasks = heads * cpu::ceil_div(blocks, per);
                // As many tasks as 4 per thread, or one per block.
                EXPECT_TRUE(tasks >= 4 * threads || per == 1)
                    << heads << " " << blocks << " " << threads;
            }
}

TEST(TileSize, FusedBackwardOnlyWhenTasksSpreadEvenly) {
    EXPECT_TRUE(cpu::fuse_dq(8, 2, 1 << 20, false));
    EXPECT_TRUE(cpu::fuse_dq(5, 2, 1 << 20, false));    // 3 rounds x 2 = 6 <= 1.25 x 5
    EXPECT_FALSE(cpu::fuse_dq(3, 2, 1 << 20, false));   // 4 > 1.25 x 3
    EXPECT_FALSE(cpu::fuse_dq(1, 2, 1 << 20, false));   // a thread would idle
    EXPECT_FALSE(cpu::fuse_dq(8, 2, int64_t(1) << 30, false));  // buffer too large
    EXPECT_FALSE(cpu::fuse_dq(8, 2, 1 << 20, true));    // varlen needs 8 tasks per thread
    EXPECT_TRUE(cpu::fuse_dq(16, 2, 1 << 20, true));
}

// Gradients left out are not computed; the others are bitwise those of a full backward.
TEST(Backward, ComputesOnlyTheGradientsAskedFor) {
    const Case c = fused_vs_two_pass_case();
    Inputs in = make_inputs(c, DType::f32);
    const Result full = run_case(c, in, DType::f32, Backend::cpu);
    Tensor out(in.dout.shape(), DType::f32), lse({c.B, c.Hq, c.Sq}, DType::f32);
    const AttentionOptions o = options_for(c, in, Backend::cpu);
    forward({in.q.view(), in.k.view(), in.v.view(), out.view(), lse.view()}, o);
    for (int mask = 1; mask < 8; ++mask) {
        Tensor dq(in.q.shape(), DType::f32), dk(in.k.shape(), DType::f32),
            dv(in.v.shape(), DType::f32);
        for (Tensor* t : {&dq, &dk, &dv}) t->fill(-7);
        backward({.q = in.q.view(), .k = in.k.view(), .v = in.v.view(), .out = out.view(),
                  .dout = in.dout.view(), .lse = lse.view(),
                  .dq = mask & 1 ? dq.view() : TensorView{},
                  .dk = mask & 2 ? dk.view() : TensorView{},
                  .dv = mask & 4 ? dv.view() : TensorView{}},
                 o);
        const std::vector<double> untouched(size_t(dq.numel()), -7.0);
        EXPECT_EQ(dq.values(), mask & 1 ? full.dq : untouched) << mask;
        EXPECT_EQ(dk.values(), mask & 2 ? full.dk : std::vector<double>(size_t(dk.numel()), -7.0));
        EXPECT_EQ(dv.values(), mask & 4 ? full.dv : std::vector<double>(size_t(dv.numel()), -7.0));
    }
}

TEST(Concurrency, CallsFromManyThreadsMatchSerialResults) {
    const Case c = determinism_case();
    Inputs in = make_inputs(c, DType::bf16);
    const Result serial = run_case(c, in, DType::bf16, Backend::cpu);
    std::vector<Result> results(4);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([&, t] { results[t] = run_case(c, in, DType::bf16, Backend::cpu); });
    for (auto& t : threads) t.join();
    for (const Result& r : results) {
        EXPECT_EQ(r.out, serial.out);
        EXPECT_EQ(r.dq, serial.dq);
        EXPECT_EQ(r.dk, serial.dk);
    }
}

// With v = identity (Dv = Sk), out[i, j] = P_ij * Z_ij: the mask can be read off the output.
TEST(Dropout, MaskIsExactlyDesignsPhiloxMask) {
    for (Backend backend : {Backend::cpu, Backend::reference}) {
        const int64_t B = 2, S = 37, H = 3;
        const double p = 0.3;
        Case c{.name = "mask", .B = B, .Sq = S, .Sk = S, .Hq = H, .Hkv = H, .D = 8, .Dv = S,
               .dropout = p, .seed = 0xfeedface12345678ULL, .offset = 42};
        Inputs in = make_inputs(c, DType::f64);
        in.v.fill(0);
        for (int64_t b = 0; b < B; ++b)
            for (int64_t j = 0; j < S; ++j)
                for (int64_t h = 0; h < H; ++h) in.v.set(((b * S + j) * H + h) * S + j, 1.0);
        Tensor out({B, S, H, S}, DType::f64), lse({B, H, S}, DType::f32);
        forward({.q = in.q.view(), .k = in.k.view(), .v = in.v.view(), .out = out.view(),
                 .lse = lse.view()},
                options_for(c, in, backend));
        const uint32_t threshold = dropout_keep_threshold(p);
        int64_t kept = 0;
        for (int64_t b = 0; b < B; ++b)
            for (int64_t i = 0; i < S; ++i)
                for (int64_t h = 0; h < H; ++h)
                    for (int64_t j = 0; j < S; ++j) {
                        const bool keep = dropout_keep(c.seed, 42, threshold, b * H + h, i, j);
                        const double o = out.get(((b * S + i) * H + h) * S + j);
                        EXPECT_EQ(o != 0.0, keep) << "b=" << b << " h=" << h << " i=" << i
                                                  << " j=" << j;
                        kept += keep;
                    }
        EXPECT_NEAR(double(kept) / double(B * H * S * S), 1 - p, 0.02);
    }
}

TEST(Dropout, OutputIsUnbiasedOverSeeds) {
    Case c{.name = "unbiased", .Sq = 4, .Sk = 16, .Hq = 1, .Hkv = 1, .D = 8, .dropout = 0.3};
    Inputs in = make_inputs(c, DType::f64);
    Case plain = c;
    plain.dropout = 0;
    const std::vector<double> want = run_case(plain, in, DType::f64, Backend::cpu).out;
    std::vector<double> mean(want.size(), 0.0);
    const int seeds = 400;
    for (int s = 0; s < seeds; ++s) {
        c.seed = uint64_t(s) * 0x9E3779B97F4A7C15ULL;
        const std::vector<double> out = run_case(c, in, DType::f64, Backend::cpu).out;
        for (size_t n = 0; n < out.size(); ++n) mean[n] += out[n] / seeds;
    }
    EXPECT_LE(rel_error(mean, want), 0.05);
}

TEST(CallLog, OneLinePerCallWithSeparateCounters) {
    const std::string path = ::testing::TempDir() + "orchard_log_test.log";
    std::remove(path.c_str());
    setenv("ORCHARD_DEBUG_FLASH_ATN", "1", 1);
    setenv("ORCHARD_LOG_FILE", path.c_str(), 1);
    reset_stats();
    const Case c{.name = "log", .Sq = 9, .Sk = 11, .Hq = 4, .Hkv = 2, .D = 16, .causal = true};
    Inputs in = make_inputs(c, DType::bf16);
    run_case(c, in, DType::bf16, Backend::cpu);  // FWD + BWD
    run_case(c, in, DType::bf16, Backend::cpu);  // FWD + BWD
    record_fallback(Direction::forward, "orchard.scaled_dot_product_attention", "torch-sdpa",
                    "attn_mask");
    unsetenv("ORCHARD_DEBUG_FLASH_ATN");
    run_case(c, in, DType::bf16, Backend::cpu);  // counted, not logged
    unsetenv("ORCHARD_LOG_FILE");

    const Stats s = stats();
    EXPECT_EQ(s.calls[int(Direction::forward)][int(Backend::cpu)], 3);
    EXPECT_EQ(s.calls[int(Direction::backward)][int(Backend::cpu)], 3);
    EXPECT_EQ(s.fallbacks[int(Direction::forward)], 1);
    EXPECT_EQ(s.fallbacks[int(Direction::backward)], 0);

    std::ifstream f(path);
    std::vector<std::string> lines;
    for (std::string line; std::getline(f, line);) lines.push_back(line);
    ASSERT_EQ(lines.size(), 5u);
    const std::regex fwd("^FWD call=(\\d+) backend=cpu op=orchard::forward B=1 Sq=9 Sk=11 Hq=4 "
                         "Hkv=2 D=16 Dv=16 dtype=bfloat16 .*window=\\(-1,0\\).*fallback=none$");
    const std::regex bwd("^BWD call=(\\d+) backend=cpu op=orchard::backward .*");
    std::smatch m0, m2;
    ASSERT_TRUE(std::regex_match(lines[0], m0, fwd)) << lines[0];
    ASSERT_TRUE(std::regex_match(lines[1], bwd)) << lines[1];
    ASSERT_TRUE(std::regex_match(lines[2], m2, fwd)) << lines[2];
    EXPECT_EQ(std::stoll(m2[1]), std::stoll(m0[1]) + 1);  // FWD counts FWD calls only
    std::smatch b1, b3;
    ASSERT_TRUE(std::regex_match(lines[1], b1, bwd));
    ASSERT_TRUE(std::regex_match(lines[3], b3, bwd));
    EXPECT_EQ(std::stoll(b3[1]), std::stoll(b1[1]) + 1);
    EXPECT_EQ(lines[4], "FWD call=" + std::to_string(std::stoll(m2[1]) + 1) +
                            " backend=torch-sdpa op=orchard.scaled_dot_product_attention "
                            "fallback=attn_mask");
}

}  // namespace
}  // namespace orchard::test

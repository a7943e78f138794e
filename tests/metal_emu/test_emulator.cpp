// Self-tests of the Metal emulator: simdgroup_matrix and simd functions against their MSL
// definitions, barriers, and that divergence and out-of-bounds accesses are reported.
#include "tests/metal_emu/selftest.metal"
#include "metal_emu/prelude_end.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "metal_emu/runtime.h"

namespace {

using orchard_emu::Buffer;
using orchard_emu::checked_ptr;
using orchard_emu::dispatch;
using orchard_emu::KernelError;
using orchard_emu::Launch;
using orchard_emu::ThreadIds;

Buffer buffer_of(const char* name, std::vector<float>& v) {
    return {name, reinterpret_cast<const char*>(v.data()),
            reinterpret_cast<const char*>(v.data() + v.size())};
}

// The KernelError message of a launch that must fail.
std::string error_of(const Launch& launch, const orchard_emu::KernelBody& body) {
    try {
        dispatch(launch, body);
    } catch (const KernelError& e) {
        return e.what();
    }
    return "(no error)";
}

TEST(Emulator, SimdgroupMatrixMultiplyAccumulateMatchesNaive) {
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> dist(-1, 1);
    std::vector<float> a(64), bt(64), c(64), d(64, 0.0f);
    for (auto* m : {&a, &bt, &c})
        for (float& x : *m) x = dist(rng);
    const Buffer ba = buffer_of("a", a), bb = buffer_of("bt", bt), bc = buffer_of("c", c),
                 bd = buffer_of("d", d);
    dispatch({"matmul8", {1, 1, 1}, 32, 256}, [&](const ThreadIds& id, checked_ptr<float> smem) {
        selftest::matmul8({a.data(), &ba}, {bt.data(), &bb}, {c.data(), &bc}, {d.data(), &bd},
                          smem, id.lane);
    });
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) {
            double want = c[i * 8 + j];
            for (int k = 0; k < 8; ++k) want += double(a[i * 8 + k]) * bt[j * 8 + k];
            EXPECT_NEAR(d[i * 8 + j], want, 1e-5) << "d[" << i << "][" << j << "]";
        }
}

TEST(Emulator, SimdFunctionsFollowMsl) {
    std::vector<float> out(6 * 64, -1.0f);
    const Buffer bo = buffer_of("out", out);
    dispatch({"shuffles", {1, 1, 1}, 64, 0}, [&](const ThreadIds& id, checked_ptr<float>) {
        selftest::shuffles({out.data(), &bo}, id.tid, id.lane);
    });
    float max_x7 = 0;
    for (int l = 0; l < 32; ++l) max_x7 = std::max(max_x7, float(l * (l % 7)));
    for (int t = 0; t < 64; ++t) {  // two simdgroups, each on its own lanes
        const int lane = t % 32;
        const float* r = &out[6 * t];
        EXPECT_EQ(r[0], float(lane ^ 5)) << "simd_shuffle_xor, lane " << lane;
        // simd_shuffle_down does not wrap: the top 3 lanes keep their own value.
        EXPECT_EQ(r[1], float(lane + 3 < 32 ? lane + 3 : lane)) << "simd_shuffle_down";
        EXPECT_EQ(r[2], float(31 - lane)) << "simd_shuffle";
        EXPECT_EQ(r[3], float(31 * 32 / 2)) << "simd_sum";
        EXPECT_EQ(r[4], max_x7) << "simd_max";
        EXPECT_EQ(r[5], 109.0f) << "simd_broadcast";
    }
}

TEST(Emulator, ThreadgroupArrayIsSharedAndOrderedByBarrier) {
    std::vector<float> in(3 * 64), out(3 * 64);
    for (size_t i = 0; i < in.size(); ++i) in[i] = float(i);
    const Buffer bi = buffer_of("in", in), bo = buffer_of("out", out);
    dispatch({"reverse", {3, 1, 1}, 64, 0}, [&](const ThreadIds& id, checked_ptr<float>) {
        selftest::reverse({in.data(), &bi}, {out.data(), &bo}, id.tid, id.tgid);
    });
    for (int g = 0; g < 3; ++g)
        for (int t = 0; t < 64; ++t) EXPECT_EQ(out[g * 64 + t], float(g * 64 + 63 - t));
}

// A lane writes only its own two elements in simdgroup_store, so reading another lane's part
// before a simdgroup_barrier sees the threadgroup memory's initial NaN, as a race would.
TEST(Emulator, SimdgroupStoreWithoutBarrierIsVisible) {
    std::vector<float> out(32);
    const Buffer bo = buffer_of("out", out);
    dispatch({"store_then_read", {1, 1, 1}, 32, 64},
             [&](const ThreadIds& id, checked_ptr<float> smem) {
                 selftest::store_then_read({out.data(), &bo}, smem, id.lane);
             });
    EXPECT_TRUE(std::isnan(out[0])) << "lane 0 read element 63 before lane 31 stored it";
    EXPECT_EQ(out[31], 2.0f) << "lane 31 read element 1, stored by lane 0 before";
}

TEST(Emulator, ReportsBarrierReachedByPartOfTheThreadgroup) {
    std::vector<float> out(64);
    const Buffer bo = buffer_of("out", out);
    const std::string msg = error_of({"divergent_barrier", {1, 1, 1}, 64, 64},
                                     [&](const ThreadIds& id, checked_ptr<float> smem) {
                                         selftest::divergent_barrier({out.data(), &bo}, smem, id.tid);
                                     });
    EXPECT_NE(msg.find("kernel divergent_barrier, threadgroup (0, 0, 0): threadgroup barrier "
                       "divergence"), std::string::npos) << msg;
    EXPECT_NE(msg.find("thread 0: threadgroup_barrier at selftest.metal:"), std::string::npos) << msg;
    EXPECT_NE(msg.find("thread 32: exited"), std::string::npos) << msg;
}

TEST(Emulator, ReportsThreadsAtDifferentBarriers) {
    const std::string msg = error_of({"mismatched_barriers", {1, 1, 1}, 32, 0},
                                     [&](const ThreadIds& id, checked_ptr<float>) {
                                         selftest::mismatched_barriers(id.tid);
                                     });
    EXPECT_NE(msg.find("threadgroup barrier divergence"), std::string::npos) << msg;
}

TEST(Emulator, ReportsSimdOperationInDivergentBranch) {
    std::vector<float> out(32);
    const Buffer bo = buffer_of("out", out);
    const std::string msg = error_of({"divergent_simd_sum", {1, 1, 1}, 32, 0},
                                     [&](const ThreadIds& id, checked_ptr<float>) {
                                         selftest::divergent_simd_sum({out.data(), &bo}, id.lane);
                                     });
    EXPECT_NE(msg.find("simdgroup divergence in simdgroup 0"), std::string::npos) << msg;
    EXPECT_NE(msg.find("thread 16: exited"), std::string::npos) << msg;
}

TEST(Emulator, ReportsOutOfBoundsWrite) {
    std::vector<float> out(64);
    const Buffer bo = buffer_of("out", out);
    const std::string msg = error_of({"write_past_end", {1, 1, 1}, 64, 0},
                                     [&](const ThreadIds& id, checked_ptr<float>) {
                                         selftest::write_past_end({out.data(), &bo}, id.tid);
                                     });
    EXPECT_NE(msg.find("out-of-bounds access to buffer 'out': 4 bytes at byte offset 256, buffer "
                       "has 256 bytes (thread 63)"), std::string::npos) << msg;
}

TEST(Emulator, ReportsOutOfBoundsThreadgroupRead) {
    std::vector<float> out(32);
    const Buffer bo = buffer_of("out", out);
    const std::string msg = error_of({"read_before_smem", {1, 1, 1}, 32, 32},
                                     [&](const ThreadIds& id, checked_ptr<float> smem) {
                                         selftest::read_before_smem({out.data(), &bo}, smem, id.tid);
                                     });
    EXPECT_NE(msg.find("out-of-bounds access to buffer 'threadgroup memory': 4 bytes at byte "
                       "offset -4"), std::string::npos) << msg;
}

}  // namespace

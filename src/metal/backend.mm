// The Metal backend on Apple hardware (ORCHARD_METAL=ON): the metallib built from
// src/metal/*.metal, dispatched on the caller's MTLCommandQueue (AttentionOptions::stream) or a
// default one. Tensors are (MTLBuffer, byte offset) views: TensorView::data is the buffer,
// AttentionParams::offsets the offsets; the backward's workspace is an MTLBuffer too.
//
// NOT YET COMPILED OR RUN: written on Linux, where no Metal toolchain exists. The kernels it
// launches are verified through the CPU emulator (docs/metal_backend.md); the grids, names and
// constant buffer come from launch.cpp, which the emulator build uses as well.
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <cstdlib>
#include <mutex>
#include <string>

#include "core/backend.h"
#include "metal/launch.h"

namespace orchard::metal_host {
namespace {

struct Runtime {
    id<MTLDevice> device = nil;
    id<MTLLibrary> library = nil;
    id<MTLCommandQueue> queue = nil;  // when the caller gives none
    id<MTLBuffer> unbound = nil;      // bound where a kernel takes a buffer it will not read
    NSMutableDictionary<NSString*, id<MTLComputePipelineState>>* pipelines = nil;
    std::mutex mutex;
};

[[noreturn]] void fail(const std::string& what, NSError* error) {
    throw Error(ErrorKind::internal,
                "orchard: Metal: " + what +
                    (error ? std::string(": ") + error.localizedDescription.UTF8String : ""));
}

// The metallib: ORCHARD_METALLIB (environment) or the one CMake built (ORCHARD_METALLIB_PATH).
Runtime& runtime() {
    static Runtime* r = [] {
        auto* rt = new Runtime;
        rt->device = MTLCreateSystemDefaultDevice();
        if (rt->device == nil) fail("no Metal device", nil);
        const char* env = std::getenv("ORCHARD_METALLIB");
        NSString* path = [NSString stringWithUTF8String:env ? env : ORCHARD_METALLIB_PATH];
        NSError* error = nil;
        rt->library = [rt->device newLibraryWithURL:[NSURL fileURLWithPath:path] error:&error];
        if (rt->library == nil) fail("cannot load " + std::string(path.UTF8String), error);
        rt->queue = [rt->device newCommandQueue];
        rt->unbound = [rt->device newBufferWithLength:16 options:MTLResourceStorageModePrivate];
        rt->pipelines = [[NSMutableDictionary alloc] init];
        return rt;
    }();
    return *r;
}

id<MTLComputePipelineState> pipeline(Runtime& rt, const std::string& name) {
    std::lock_guard<std::mutex> lock(rt.mutex);
    NSString* key = [NSString stringWithUTF8String:name.c_str()];
    id<MTLComputePipelineState> ps = rt.pipelines[key];
    if (ps != nil) return ps;
    id<MTLFunction> fn = [rt.library newFunctionWithName:key];
    if (fn == nil) fail("the metallib has no kernel " + name, nil);
    NSError* error = nil;
    ps = [rt.device newComputePipelineStateWithFunction:fn error:&error];
    if (ps == nil) fail("cannot build the pipeline of " + name, error);
    rt.pipelines[key] = ps;
    return ps;
}

// One command buffer per call, encoded in order and waited for: forward() / backward() return
// with their outputs written, as on the other backends.
struct Encoder {
    Runtime& rt;
    id<MTLCommandBuffer> commands;
    id<MTLComputeCommandEncoder> enc;
    msl::KernelParams params;

    Encoder(Runtime& r, const AttentionParams& p)
        : rt(r), params(kernel_params(p)) {
        id<MTLCommandQueue> queue =
            p.stream ? (__bridge id<MTLCommandQueue>)p.stream : rt.queue;
        commands = [queue commandBuffer];
        enc = [commands computeCommandEncoder];
    }
    void buffer(const void* handle, int64_t offset, int index) {
        if (handle)
            [enc setBuffer:(__bridge id<MTLBuffer>)handle offset:NSUInteger(offset) atIndex:index];
        else
            [enc setBuffer:rt.unbound offset:0 atIndex:index];
    }
    void run(const std::string& name, Grid grid) {
        if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;  // e.g. no queries: nothing to run
        [enc setComputePipelineState:pipeline(rt, name)];
        [enc setBytes:&params length:sizeof params atIndex:0];
        [enc dispatchThreadgroups:MTLSizeMake(grid.x, grid.y, grid.z)
            threadsPerThreadgroup:MTLSizeMake(msl::kThreads, 1, 1)];
    }
    void finish() {
        [enc endEncoding];
        [commands commit];
        [commands waitUntilCompleted];
        if (commands.status == MTLCommandBufferStatusError) fail("a kernel failed", commands.error);
    }
};

void attention_fwd_metal(const AttentionParams& p) {
    @autoreleasepool {
        Encoder e(runtime(), p);
        const ByteOffsets& o = p.offsets;
        e.buffer(p.q, o.q, 1);
        e.buffer(p.k, o.k, 2);
        e.buffer(p.v, o.v, 3);
        e.buffer(p.out, o.out, 4);
        e.buffer(p.lse, o.lse, 5);
        e.buffer(p.cu_seqlens_q, o.cu_seqlens_q, 6);
        e.buffer(p.cu_seqlens_k, o.cu_seqlens_k, 7);
        e.buffer(p.alibi_slopes, o.alibi_slopes, 8);
        e.run(kernel_name("attention_fwd", p), grid_by_queries(p));
        e.finish();
    }
}

void attention_bwd_metal(const AttentionParams& p) {
    // The core has checked that the workspace holds bwd_workspace_size(p) bytes.
    @autoreleasepool {
        Encoder e(runtime(), p);
        const ByteOffsets& o = p.offsets;
        // Buffer indices follow the kernels' [[buffer(n)]] (attention_bwd.metal).
        e.buffer(p.out, o.out, 1);
        e.buffer(p.dout, o.dout, 2);
        e.buffer(p.workspace, 0, 3);
        e.buffer(p.cu_seqlens_q, o.cu_seqlens_q, 4);
        e.buffer(p.cu_seqlens_k, o.cu_seqlens_k, 5);
        e.run(std::string("attention_bwd_preprocess_") + msl_type_name(p.dtype),
              grid_by_queries(p));
        // Shared by dK/dV and dQ: q k v dout lse delta at 1-6.
        e.buffer(p.q, o.q, 1);
        e.buffer(p.k, o.k, 2);
        e.buffer(p.v, o.v, 3);
        e.buffer(p.dout, o.dout, 4);
        e.buffer(p.lse, o.lse, 5);
        e.buffer(p.workspace, 0, 6);
        if (p.dk || p.dv) {
            e.buffer(p.dk, o.dk, 7);
            e.buffer(p.dv, o.dv, 8);
            e.buffer(p.cu_seqlens_q, o.cu_seqlens_q, 9);
            e.buffer(p.cu_seqlens_k, o.cu_seqlens_k, 10);
            e.buffer(p.alibi_slopes, o.alibi_slopes, 11);
            e.run(kernel_name("attention_bwd_dkdv", p), grid_by_keys(p));
        }
        if (p.dq) {
            e.buffer(p.dq, o.dq, 7);
            e.buffer(p.cu_seqlens_q, o.cu_seqlens_q, 8);
            e.buffer(p.cu_seqlens_k, o.cu_seqlens_k, 9);
            e.buffer(p.alibi_slopes, o.alibi_slopes, 10);
            e.run(kernel_name("attention_bwd_dq", p), grid_by_queries(p));
        }
        e.finish();
    }
}

}  // namespace
}  // namespace orchard::metal_host

namespace orchard {

const BackendOps& metal_backend() {
    static const BackendOps ops{Backend::metal, &metal_host::supports,
                                &metal_host::attention_fwd_metal, &metal_host::attention_bwd_metal,
                                &metal_host::bwd_workspace_size};
    return ops;
}

}  // namespace orchard

// The Metal backend of builds whose Metal kernels are dispatched by the host framework (the
// PyTorch binding: python/orchard/metal.py launches them with torch.mps.compile_shader from
// orchard::metal_forward_plan / metal_backward_plan). It answers supports() like every Metal
// build; running a kernel from C++ is not possible here, and says so.
#include "core/backend.h"
#include "metal/launch.h"

namespace orchard {
namespace {

[[noreturn]] void host_launched(const AttentionParams&) {
    throw Error(ErrorKind::unsupported,
                "orchard: in this build the Metal kernels are launched by PyTorch (orchard.metal, "
                "torch.mps.compile_shader) from orchard::metal_forward_plan / "
                "metal_backward_plan, not by orchard::forward / backward");
}

}  // namespace

const BackendOps& metal_backend() {
    static const BackendOps ops{Backend::metal, &metal_host::supports, &host_launched,
                                &host_launched, &metal_host::bwd_workspace_size};
    return ops;
}

}  // namespace orchard

// Stand-in for the CUDA backend when Orchard is built without it (ORCHARD_CUDA=OFF).
#include "core/backend.h"

namespace orchard {
namespace {

BackendSupport not_built(const AttentionParams&, Direction) {
    return {false, "Orchard was built without the CUDA backend (configure with -DORCHARD_CUDA=ON)"};
}
void unreachable(const AttentionParams&) {
    throw Error(ErrorKind::internal, "orchard: the CUDA backend is not built");
}
size_t no_workspace(const AttentionParams&) { return 0; }

}  // namespace

const BackendOps& cuda_backend() {
    static const BackendOps ops{Backend::cuda, &not_built, &unreachable, &unreachable, &no_workspace};
    return ops;
}

}  // namespace orchard

// Stand-in for the Metal backend when Orchard is built without it (ORCHARD_METAL=OFF).
#include "core/backend.h"

namespace orchard {
namespace {

BackendSupport not_built(const AttentionParams&, Direction) {
    return {false, "Orchard was built without the Metal backend (configure with -DORCHARD_METAL=ON)"};
}
void unreachable(const AttentionParams&) {
    throw Error(ErrorKind::internal, "orchard: the Metal backend is not built");
}
size_t no_workspace(const AttentionParams&) { return 0; }

}  // namespace

const BackendOps& metal_backend() {
    static const BackendOps ops{Backend::metal, &not_built, &unreachable, &unreachable, &no_workspace};
    return ops;
}

}  // namespace orchard

// The front door: every argument is checked here, once, and turned into AttentionParams.
#pragma once

#include <string>

#include "core/backend.h"
#include "core/params.h"
#include "orchard/attention.h"

namespace orchard {

struct PreparedCall {
    AttentionParams params;
    const BackendOps* ops = nullptr;  // the backend that runs it
    std::string op;                    // name used in messages and the log
    bool nothing_to_do = false;        // empty problem (B, Sq or Hq is 0): outputs are empty
};

// Throw orchard::Error (invalid_argument / unsupported) naming op, argument, expected, received.
PreparedCall prepare_forward(const ForwardArgs& args, const AttentionOptions& options);
PreparedCall prepare_backward(const BackwardArgs& args, const AttentionOptions& options,
                              Workspace workspace);

}  // namespace orchard

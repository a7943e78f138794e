// Orchard's front door: validate -> params -> pick backend -> log -> run.
#include "orchard/attention.h"

#include <string>

#include "core/call_log.h"
#include "core/thread_pool.h"
#include "core/validate.h"

namespace orchard {
namespace {

template <typename Args>
Support query(PreparedCall (*prepare)(const Args&, const AttentionOptions&), const Args& args,
              const AttentionOptions& options) {
    Support s;
    try {
        const PreparedCall call = prepare(args, options);
        s.ok = true;
        s.backend = call.params.backend;
    } catch (const Error& e) {
        s.reason = e.what();
    }
    return s;
}

PreparedCall prepare_backward_no_ws(const BackwardArgs& args, const AttentionOptions& options) {
    return prepare_backward(args, options, {});
}

}  // namespace

void forward(const ForwardArgs& args, const AttentionOptions& options) {
    const PreparedCall call = prepare_forward(args, options);
    log_call(Direction::forward, call);
    if (!call.nothing_to_do) call.ops->attention_fwd(call.params);
}

void backward(const BackwardArgs& args, const AttentionOptions& options, Workspace workspace) {
    const PreparedCall call = prepare_backward(args, options, workspace);
    // Device backends never allocate behind the caller's back: their scratch must be given.
    // (The CPU backend allocates what is missing itself.)
    if (!call.nothing_to_do && call.params.device.kind != DeviceKind::cpu) {
        const size_t need = call.ops->bwd_workspace_size(call.params);
        if (workspace.bytes < need)
            throw Error(ErrorKind::invalid_argument,
                        std::string(options.op_name ? options.op_name : "orchard::backward") +
                            ": workspace has " + std::to_string(workspace.bytes) + " bytes but the " +
                            to_string(call.params.backend) + " backend needs " +
                            std::to_string(need) + " (see backward_workspace_size)");
    }
    log_call(Direction::backward, call);
    if (!call.nothing_to_do) call.ops->attention_bwd(call.params);
}

Support supports(const ForwardArgs& args, const AttentionOptions& options) {
    return query(&prepare_forward, args, options);
}

Support supports(const BackwardArgs& args, const AttentionOptions& options) {
    return query(&prepare_backward_no_ws, args, options);
}

size_t backward_workspace_size(const BackwardArgs& args, const AttentionOptions& options) {
    const PreparedCall call = prepare_backward(args, options, {});
    return call.nothing_to_do ? 0 : call.ops->bwd_workspace_size(call.params);
}

void set_num_threads(int n) { set_pool_threads(n); }
int num_threads() { return pool_threads(); }
void set_parallel_runner(ParallelRun run, int n_workers) { set_runner(run, n_workers); }

}  // namespace orchard

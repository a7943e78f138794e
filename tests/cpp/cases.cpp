// The cross-backend case list and its runner (see cases.h).
#include "cases.h"

#include <random>
#include <sstream>

namespace orchard::test {

std::vector<Case> case_list() {
    std::vector<Case> cs;
    auto add = [&](Case c) { cs.push_back(std::move(c)); };
    add({.name = "basic"});
    add({.name = "len1", .Sq = 1, .Sk = 1});
    add({.name = "len129", .Sq = 129, .Sk = 129, .D = 64});
    add({.name = "len1000_causal", .Sq = 1000, .Sk = 1000, .Hq = 1, .Hkv = 1, .D = 64, .causal = true});
    add({.name = "sq_lt_sk_causal", .Sq = 17, .Sk = 129, .causal = true});
    add({.name = "sq_gt_sk_causal", .Sq = 129, .Sk = 17, .causal = true});  // fully masked rows
    add({.name = "sq_gt_sk", .Sq = 129, .Sk = 33});
    add({.name = "hdim8", .D = 8});
    add({.name = "hdim80", .Sq = 70, .Sk = 90, .D = 80});
    // Between built CUDA variants: 72 runs the 80 kernels, 112 the 128 ones (zero-filled columns).
    add({.name = "hdim72", .Sq = 50, .Sk = 70, .Hq = 2, .Hkv = 1, .D = 72, .causal = true});
    add({.name = "hdim112", .Sq = 65, .Sk = 40, .D = 112});
    add({.name = "hdim96", .Sq = 33, .Sk = 140, .Hq = 2, .Hkv = 1, .D = 96});
    add({.name = "hdim128_mqa_causal", .B = 2, .Sq = 300, .Sk = 300, .Hq = 4, .Hkv = 1, .D = 128,
         .causal = true});
    add({.name = "decode_like", .Sq = 3, .Sk = 1000, .Hq = 4, .Hkv = 2, .D = 64, .causal = true});
    add({.name = "hdim256", .Sq = 40, .Sk = 70, .Hq = 1, .Hkv = 1, .D = 256});
    add({.name = "dv_ne_d", .D = 48, .Dv = 24});
    add({.name = "gqa", .B = 2, .Sq = 33, .Sk = 45, .Hq = 6, .Hkv = 2, .causal = true});
    add({.name = "mqa", .Sq = 40, .Sk = 40, .Hq = 4, .Hkv = 1});
    add({.name = "window", .Sq = 150, .Sk = 150, .left = 20, .right = 7});
    add({.name = "window_causal", .Sq = 150, .Sk = 200, .causal = true, .left = 33});
    add({.name = "softcap", .Sq = 65, .Sk = 70, .softcap = 5.0, .scale = 1.0});
    add({.name = "alibi", .Sq = 65, .Sk = 70, .causal = true, .alibi = 1});
    add({.name = "alibi_batch", .B = 2, .Sq = 30, .Sk = 50, .alibi = 2});
    add({.name = "dropout", .Sq = 70, .Sk = 90, .dropout = 0.2});
    add({.name = "dropout_causal_gqa", .Sq = 50, .Sk = 50, .Hq = 4, .Hkv = 2, .causal = true, .dropout = 0.5});
    add({.name = "all_features", .B = 2, .Sq = 45, .Sk = 60, .Hq = 4, .Hkv = 2, .D = 40,
         .causal = true, .left = 25, .softcap = 3.0, .alibi = 2, .dropout = 0.1});
    add({.name = "varlen", .Hq = 4, .Hkv = 2, .causal = true,
         .seqlens_q = {5, 0, 130, 17}, .seqlens_k = {9, 3, 130, 1}});
    add({.name = "varlen_dropout_window", .left = 10, .right = 3, .dropout = 0.3,
         .seqlens_q = {33, 70}, .seqlens_k = {40, 65}});
    add({.name = "transposed", .B = 2, .Sq = 33, .Sk = 40, .layout_q = Layout::transposed,
         .layout_kv = Layout::transposed, .layout_out = Layout::transposed});
    add({.name = "offset", .B = 2, .Sq = 33, .Sk = 40, .Hq = 4, .Hkv = 2,
         .layout_q = Layout::offset, .layout_kv = Layout::offset, .layout_out = Layout::offset});
    add({.name = "expanded_kv", .Sq = 33, .Sk = 40, .Hq = 4, .Hkv = 4, .expand_kv = true});
    add({.name = "varlen_offset", .Hq = 2, .Hkv = 1, .seqlens_q = {20, 30}, .seqlens_k = {25, 11},
         .layout_q = Layout::offset, .layout_kv = Layout::transposed, .layout_out = Layout::offset});
    add({.name = "sk0", .Sq = 5, .Sk = 0});
    add({.name = "sq0", .Sq = 0, .Sk = 5});
    add({.name = "batch0", .B = 0});
    return cs;
}

std::string case_name(const Case& c, DType dt) { return c.name + "_" + to_string(dt); }

Inputs make_inputs(const Case& c, DType dt, uint32_t seed) {
    std::mt19937 rng(seed + uint32_t(std::hash<std::string>{}(c.name)));
    Inputs in;
    if (c.varlen()) {
        const int64_t B = int64_t(c.seqlens_q.size());
        in.cu_q = Tensor({B + 1}, DType::i32);
        in.cu_k = Tensor({B + 1}, DType::i32);
        in.cu_q.set(0, 0);
        in.cu_k.set(0, 0);
        for (int64_t b = 0; b < B; ++b) {
            in.total_q += c.seqlens_q[b];
            in.total_k += c.seqlens_k[b];
            in.max_q = std::max<int64_t>(in.max_q, c.seqlens_q[b]);
            in.max_k = std::max<int64_t>(in.max_k, c.seqlens_k[b]);
            in.cu_q.set(b + 1, double(in.total_q));
            in.cu_k.set(b + 1, double(in.total_k));
        }
        in.q = Tensor({in.total_q, c.Hq, c.D}, dt, c.layout_q);
        in.dout = Tensor({in.total_q, c.Hq, c.dv()}, dt, c.layout_out);
        if (c.expand_kv) {
            in.k = Tensor({in.total_k, 1, c.D}, dt, c.layout_kv);
            in.v = Tensor({in.total_k, 1, c.dv()}, dt, c.layout_kv);
        } else {
            in.k = Tensor({in.total_k, c.Hkv, c.D}, dt, c.layout_kv);
            in.v = Tensor({in.total_k, c.Hkv, c.dv()}, dt, c.layout_kv);
        }
    } else {
        in.q = Tensor({c.B, c.Sq, c.Hq, c.D}, dt, c.layout_q);
        in.dout = Tensor({c.B, c.Sq, c.Hq, c.dv()}, dt, c.layout_out);
        const int64_t h = c.expand_kv ? 1 : c.Hkv;
        in.k = Tensor({c.B, c.Sk, h, c.D}, dt, c.layout_kv);
        in.v = Tensor({c.B, c.Sk, h, c.dv()}, dt, c.layout_kv);
    }
    in.q.fill_random(rng);
    in.k.fill_random(rng);
    in.v.fill_random(rng);
    in.dout.fill_random(rng);
    if (c.expand_kv) {
        const int head_dim = c.varlen() ? 1 : 2;
        in.k = Tensor::expanded(in.k, head_dim, c.Hkv);
        in.v = Tensor::expanded(in.v, head_dim, c.Hkv);
    }
    if (c.alibi) {
        const int64_t B = c.varlen() ? int64_t(c.seqlens_q.size()) : c.B;
        in.alibi = c.alibi == 1 ? Tensor({c.Hq}, DType::f32) : Tensor({B, c.Hq}, DType::f32);
        in.alibi.fill_random(rng, 0.01, 0.3);
    }
    return in;
}

TensorView on_backend(TensorView v, Backend backend) {
    if (backend == Backend::metal && !v.empty_view()) v.device = {DeviceKind::metal, 0};
    return v;
}

AttentionOptions options_for(const Case& c, Inputs& in, Backend backend) {
    AttentionOptions o;
    o.scale = c.scale;
    o.causal = c.causal;
    o.window_left = c.left;
    o.window_right = c.right;
    o.softcap = c.softcap;
    if (c.alibi) o.alibi_slopes = on_backend(in.alibi.view(), backend);
    o.dropout_p = c.dropout;
    o.seed = c.seed;
    o.offset = c.offset;
    o.q_position_offset = c.q_pos;
    o.k_position_offset = c.k_pos;
    o.backend = backend;
    if (c.varlen()) {
        o.cu_seqlens_q = on_backend(in.cu_q.view(), backend);
        o.cu_seqlens_k = on_backend(in.cu_k.view(), backend);
        o.max_seqlen_q = in.max_q;
        o.max_seqlen_k = in.max_k;
    }
    return o;
}

namespace {

Tensor like(Tensor& t, DType dt, Layout layout) { return Tensor(t.shape(), dt, layout); }

std::vector<int64_t> lse_shape(const Case& c, const Inputs& in) {
    if (c.varlen()) return {c.Hq, in.total_q};
    return {c.B, c.Hq, c.Sq};
}

Result run(const Case& c, Inputs& in, Tensor& q, Tensor& k, Tensor& v, Tensor& dout, DType dt,
           Backend backend, Layout out_layout) {
    Tensor out(dout.shape(), dt, out_layout);
    Tensor lse(lse_shape(c, in), DType::f32, out_layout);
    const AttentionOptions o = options_for(c, in, backend);
    auto at = [&](Tensor& t) { return on_backend(t.view(), backend); };
    forward({.q = at(q), .k = at(k), .v = at(v), .out = at(out), .lse = at(lse)}, o);
    Tensor dq = like(q, dt, out_layout), dk(k.shape(), dt, out_layout), dv(v.shape(), dt, out_layout);
    const BackwardArgs args{.q = at(q), .k = at(k), .v = at(v), .out = at(out), .dout = at(dout),
                            .lse = at(lse), .dq = at(dq), .dk = at(dk), .dv = at(dv)};
    // GPU backends take their scratch from the caller (the CPU allocates its own when none).
    Workspace ws;
    std::vector<double> scratch;  // doubles: 8-byte aligned; rounded up to the 64-byte rule
    if (backend == Backend::metal) {
        const size_t bytes = backward_workspace_size(args, o);
        scratch.resize(bytes / 8 + 16);
        const auto addr = reinterpret_cast<uintptr_t>(scratch.data());
        ws = {reinterpret_cast<void*>((addr + 63) / 64 * 64), bytes};
    }
    backward(args, o, ws);
    return {out.values(), lse.values(), dq.values(), dk.values(), dv.values()};
}

}  // namespace

Result run_case(const Case& c, Inputs& in, DType dt, Backend backend) {
    return run(c, in, in.q, in.k, in.v, in.dout, dt, backend, c.layout_out);
}

Result run_reference(const Case& c, Inputs& in) {
    auto f64 = [](Tensor& t) {
        Tensor r(t.shape(), DType::f64);
        r.copy_from(t);
        return r;
    };
    Tensor q = f64(in.q), k = f64(in.k), v = f64(in.v), dout = f64(in.dout);
    return run(c, in, q, k, v, dout, DType::f64, Backend::reference, Layout::contiguous);
}

}  // namespace orchard::test

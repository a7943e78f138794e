// Overlap tests for strided views, so outputs never alias inputs or each other.
#pragma once

#include "orchard/tensor_view.h"

namespace orchard {

// True when two distinct elements of `view` share memory (a stride-0 or self-overlapping
// dimension). Writing such a view would lose values.
bool has_internal_overlap(const TensorView& view);

// False only when the two views provably share no byte. Exact for disjoint byte ranges and for
// interleaved views of one packed tensor (q, k, v = qkv[:, :, 0], qkv[:, :, 1], ...);
// conservative (true) otherwise.
bool may_overlap(const TensorView& a, const TensorView& b);

}  // namespace orchard

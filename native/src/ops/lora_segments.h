// The LoRA segment list of an op's `segments` argument, checked (ops/lora.cc): shared by the
// lora ops and the linear ops that take an optional LoRA of the same projection.
#pragma once
#include <utility>
#include <vector>

#include "op.h"

namespace mlora {

// rows, in, out: of the op's x [rows, in] and y/dy [rows, out]; io: the op's tensors, which no
// segment tensor may overlap; backward: da/db are read too.
std::vector<LoraSegment> parse_segments(Args& a, int64_t rows, int64_t in, int64_t out, bool backward,
                                        const std::vector<std::pair<const char*, const TensorImpl*>>& io);

}  // namespace mlora

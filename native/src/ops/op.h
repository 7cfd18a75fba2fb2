// The op table: each op is a parser that checks one JavaScript op object
// ({op: "rmsnorm_forward", y, x, w, eps, ...}) on the JS thread and returns the kernel call
// to run later, off the JS thread. Every check failure names the op, its index in the list
// and the argument. Parsers register themselves with MLORA_OP in ops/<family>.cc.
#pragma once
#include <napi.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "../core/device.h"
#include "../core/exec.h"
#include "../kernels.h"

namespace mlora {

using Kernel = std::function<void(Exec&)>;
// A tensor argument with its name, for the checks over several arguments at once.
using Named = std::pair<const char*, const TensorImpl*>;

class Args {
 public:
  Args(Napi::Env env, Napi::Object obj, std::string context, DeviceState* dev)
      : env_(env), obj_(obj), ctx_(std::move(context)), dev_(dev) {}

  // A Tensor argument on this op's device with one of the allowed dtypes.
  TensorImpl tensor(const char* name, std::initializer_list<DType> allowed);
  bool has(const char* name) const;
  double number(const char* name);
  double number(const char* name, double fallback);
  int64_t integer(const char* name);
  int64_t integer(const char* name, int64_t fallback);
  bool flag(const char* name, bool fallback);
  std::vector<Args> list(const char* name);  // an array of objects (e.g. LoRA segments)
  std::vector<TensorImpl> tensor_list(const char* name, std::initializer_list<DType> allowed);

  // Checks a tensor's shape; -1 in `expect` matches anything.
  void expect_shape(const char* name, const TensorImpl& t, std::vector<int64_t> expect);
  void expect_numel(const char* name, const TensorImpl& t, int64_t n);
  void expect_distinct(const char* a, const TensorImpl& ta, const char* b, const TensorImpl& tb);
  // Each output overlaps no other output and no input: a kernel writes its outputs while it
  // still reads its inputs.
  void expect_outputs_distinct(std::initializer_list<Named> outputs, std::initializer_list<Named> inputs);
  [[noreturn]] void fail(const std::string& msg) const;
  const std::string& context() const { return ctx_; }

 private:
  Napi::Value get(const char* name) const;
  TensorImpl tensor_value(Napi::Value v, const char* name, std::initializer_list<DType> allowed);
  Napi::Env env_;
  Napi::Object obj_;
  std::string ctx_;
  DeviceState* dev_;
};

// The checks of one JavaScript number, for op objects (Args) and for the handles' positional
// arguments (addon.cc) alike. `what` names the argument ("op 3 (gemm): argument 'm'"); a failure
// throws Error(what + " must be ...", kErrBadInput).
double js_number(Napi::Value v, const std::string& what);                             // finite
int64_t js_integer(Napi::Value v, const std::string& what, int64_t min = INT64_MIN);  // exact, >= min

using Parser = Kernel (*)(Args&);
void register_op(const char* name, Parser parser);
Parser find_op(const std::string& name);
std::vector<std::string> op_names();

struct OpRegistrar {
  OpRegistrar(const char* name, Parser p) { register_op(name, p); }
};

#define MLORA_OP(NAME)                                               \
  static ::mlora::Kernel parse_##NAME(::mlora::Args& a);             \
  static ::mlora::OpRegistrar registrar_##NAME(#NAME, parse_##NAME); \
  static ::mlora::Kernel parse_##NAME(::mlora::Args& a)

inline WeightRef weight(const TensorImpl& t) {
  WeightRef w{t.data(), t.dtype};
  if (t.shape.size() == 2) w.rows = t.shape[0], w.cols = t.shape[1];
  return w;
}
// The panels Device.packWeights made of this view of a 2-D weight for one of its GEMMs, or nullptr.
inline const WeightPanels* find_panels(const TensorImpl& t, bool forward, bool bf16) {
  for (const WeightPanels& p : t.storage->panels)
    if (p.forward == forward && p.bf16 == bf16 && p.offset == t.offset && p.dtype == t.dtype && p.rows == t.shape[0] &&
        p.cols == t.shape[1])
      return &p;
  return nullptr;
}
// A linear's weight for one of its two GEMMs, with the panels Device.packWeights made for that
// GEMM and view where there are (CPU only: other backends never get them).
inline WeightRef linear_weight(const TensorImpl& t, bool forward, bool bf16) {
  WeightRef w = weight(t);
  w.bf16_compute = bf16;
  if (t.device().kind() != DeviceKind::CPU) return w;
  if (const WeightPanels* p = find_panels(t, forward, bf16)) w.panels = static_cast<const float*>(p->storage->ptr);
  return w;
}
// The dtypes a frozen base weight may have: float storage or a quantized blob.
#define MLORA_WEIGHT_DTYPES \
  { DType::F32, DType::F16, DType::BF16, DType::NF4, DType::NF4DQ, DType::INT8 }

// The optional trailing 'window' of the attention ops: 0 (default) = no sliding window, W > 0 =
// query i sees keys j with i - W < j <= i.
inline int64_t attention_window(Args& a) {
  int64_t w = a.integer("window", 0);
  if (w < 0) a.fail("argument 'window' must be >= 0 (0 = no sliding window), got " + std::to_string(w));
  return w;
}

}  // namespace mlora

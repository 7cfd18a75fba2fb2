// The N-API surface only: argument checks, handles, async work. The addon is
// context-aware (loaded once per worker thread); all state hangs off AddonData or a Device.
// Nothing here ends the process: every failure becomes a JavaScript Error.
#include "addon.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <new>
#include <thread>

#include "cpu/checksum.h"
#include "cpu/cpu_features.h"
#include "ops/op.h"

namespace mlora {

namespace {

AddonData* data_of(Napi::Env env) { return env.GetInstanceData<AddonData>(); }

// Marks the objects that are Tensors (a type tag is one private-property check, where
// instanceof walks the prototype chain and reads Symbol.hasInstance on every argument).
constexpr napi_type_tag kTensorTag = {0x6d6c6f7261546e73ULL, 0x3c1f0e2d9a8b7c65ULL};

// `code` (ERR_MLORA_OOM, ...) lets callers, and the threads they report to, tell failures apart
// without reading the message.
[[noreturn]] void throw_js(Napi::Env env, const std::string& msg, const char* code = nullptr) {
  Napi::Error e = Napi::Error::New(env, msg);
  if (code) e.Set("code", Napi::String::New(env, code));
  throw e;
}

// A positional argument that must be an integer >= min, checked by the ops' own check (ops/op.h).
int64_t integer_arg(Napi::Env env, Napi::Value v, const std::string& what, int64_t min) {
  try {
    return js_integer(v, what, min);
  } catch (const Error& e) {
    throw_js(env, e.what(), e.code);
  }
}

const char* code_of(const std::exception& e) {
  if (dynamic_cast<const std::bad_alloc*>(&e)) return kErrOutOfMemory;
  auto* m = dynamic_cast<const Error*>(&e);
  return m ? m->code : nullptr;
}

DType parse_dtype(Napi::Env env, Napi::Value v, const char* what) {
  if (!v.IsString())
    throw_js(env, std::string(what) + ": dtype must be a string (f32, f16, bf16, i32, nf4, nf4dq, int8)");
  DType d;
  std::string s = v.As<Napi::String>().Utf8Value();
  if (!dtype_from_name(s, &d))
    throw_js(env, std::string(what) + ": unknown dtype '" + s + "' (f32, f16, bf16, i32, nf4, nf4dq, int8)");
  return d;
}

std::vector<int64_t> parse_shape(Napi::Env env, Napi::Value v, const char* what) {
  if (!v.IsArray()) throw_js(env, std::string(what) + ": shape must be an array of non-negative integers");
  Napi::Array a = v.As<Napi::Array>();
  if (a.Length() == 0 || a.Length() > 8) throw_js(env, std::string(what) + ": shape must have 1 to 8 dimensions");
  std::vector<int64_t> s;
  double total = 1;
  for (uint32_t i = 0; i < a.Length(); i++) {
    int64_t d = integer_arg(env, a.Get(i), std::string(what) + ": shape[" + std::to_string(i) + "]", 0);
    total *= double(d);
    s.push_back(d);
  }
  if (total > double(int64_t(1) << 40)) throw_js(env, std::string(what) + ": shape is absurdly large");
  return s;
}

// The element type a typed array holds, for checks against a tensor's dtype.
bool typed_array_matches(napi_typedarray_type t, DType d) {
  switch (d) {
    case DType::F32: return t == napi_float32_array;
    case DType::I32: return t == napi_int32_array;
    case DType::F16:
    case DType::BF16: return t == napi_uint16_array;
    default: return t == napi_uint8_array;  // a quantized blob, byte for byte (QuantLayout)
  }
}

struct TypedView {
  void* data;
  size_t bytes;
  napi_typedarray_type type;
};

// Works for typed arrays over ArrayBuffers and over SharedArrayBuffers alike.
TypedView typed_view(Napi::Env env, Napi::Value v, const char* what) {
  if (!v.IsTypedArray()) throw_js(env, std::string(what) + ": expected a typed array");
  napi_typedarray_type type;
  size_t length;
  void* data = nullptr;
  napi_value ab;
  size_t offset;
  if (napi_get_typedarray_info(env, v, &type, &length, &data, &ab, &offset) != napi_ok)
    throw_js(env, std::string(what) + ": cannot read the typed array");
  size_t elem = 1;
  switch (type) {
    case napi_int16_array:
    case napi_uint16_array: elem = 2; break;
    case napi_int32_array:
    case napi_uint32_array:
    case napi_float32_array: elem = 4; break;
    case napi_float64_array:
    case napi_bigint64_array:
    case napi_biguint64_array: elem = 8; break;
    default: elem = 1;
  }
  return TypedView{data, length * elem, type};
}

// read(into, offset) and write(src, offset): info[0] a typed array of t's element type, info[1]
// where in t its elements start (default 0). Returns the array and that start in bytes; throws
// naming `what` where the type is another or the elements would not lie inside t.
std::pair<TypedView, size_t> element_range(Napi::Env env, const Napi::CallbackInfo& info, const TensorImpl& t,
                                           const std::string& what) {
  TypedView v = typed_view(env, info[0], what.c_str());
  if (!typed_array_matches(v.type, t.dtype))
    throw_js(env,
             what + ": a " + dtype_name(t.dtype) + " tensor takes a " +
                 (t.dtype == DType::F32   ? "Float32Array"
                  : t.dtype == DType::I32 ? "Int32Array"
                                          : "Uint16Array"),
             kErrBadInput);
  int64_t off = info.Length() > 1 && !info[1].IsUndefined() ? integer_arg(env, info[1], what + ": offset", 0) : 0;
  size_t es = dtype_size(t.dtype);
  if (size_t(off) * es + v.bytes > t.nbytes())
    throw_js(env,
             what + ": " + std::to_string(v.bytes / es) + " elements at offset " + std::to_string(off) +
                 " do not fit in a tensor of " + std::to_string(t.numel()) + " elements " + t.shape_str(),
             kErrBadInput);
  return {v, size_t(off) * es};
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Tensor

Napi::Function JsTensor::Init(Napi::Env env) {
  return DefineClass(env, "Tensor",
                     {
                         InstanceAccessor<&JsTensor::Dtype>("dtype"),
                         InstanceAccessor<&JsTensor::Shape>("shape"),
                         InstanceAccessor<&JsTensor::Bytes>("bytes"),
                         InstanceAccessor<&JsTensor::DeviceName>("device"),
                         InstanceAccessor<&JsTensor::Freed>("freed"),
                         InstanceAccessor<&JsTensor::Borrowed>("borrowed"),
                         InstanceMethod<&JsTensor::Read>("read"),
                         InstanceMethod<&JsTensor::Write>("write"),
                         InstanceMethod<&JsTensor::Rows>("rows"),
                         InstanceMethod<&JsTensor::Reshape>("reshape"),
                         InstanceMethod<&JsTensor::Free>("free"),
                     });
}

JsTensor::JsTensor(const Napi::CallbackInfo& info) : Napi::ObjectWrap<JsTensor>(info) {
  // Only the addon makes tensors (through a Device); a bare `new Tensor()` is a dead handle.
  freed = true;
  napi_type_tag_object(info.Env(), info.This(), &kTensorTag);
}

Napi::Object JsTensor::Make(Napi::Env env, TensorImpl impl, Napi::Value keep_alive) {
  Napi::Object obj = data_of(env)->tensor_ctor.New({});
  JsTensor* t = JsTensor::Unwrap(obj);
  t->impl = std::move(impl);
  t->freed = false;
  if (keep_alive.IsObject()) t->keep_alive_ = Napi::Persistent(keep_alive.As<Napi::Object>());
  return obj;
}

JsTensor* JsTensor::Unwrap(Napi::Value v) {
  if (!v.IsObject()) return nullptr;
  Napi::Env env = v.Env();
  bool is = false;
  if (napi_check_object_type_tag(env, v, &kTensorTag, &is) != napi_ok || !is) return nullptr;
  return Napi::ObjectWrap<JsTensor>::Unwrap(v.As<Napi::Object>());
}

void JsTensor::check_live(Napi::Env env, const char* what) {
  if (freed) throw_js(env, std::string("Tensor.") + what + ": the tensor has been freed");
}

Napi::Value JsTensor::Dtype(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), dtype_name(impl.dtype));
}
Napi::Value JsTensor::Shape(const Napi::CallbackInfo& info) {
  Napi::Array a = Napi::Array::New(info.Env(), impl.shape.size());
  for (size_t i = 0; i < impl.shape.size(); i++)
    a.Set(uint32_t(i), Napi::Number::New(info.Env(), double(impl.shape[i])));
  return a;
}
Napi::Value JsTensor::Bytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), double(impl.nbytes()));
}
Napi::Value JsTensor::DeviceName(const Napi::CallbackInfo& info) {
  if (!impl.storage) return info.Env().Null();
  return Napi::String::New(info.Env(), impl.storage->device->name());
}
Napi::Value JsTensor::Freed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), freed); }
Napi::Value JsTensor::Borrowed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), impl.storage && impl.storage->borrowed);
}

// read(): a copy in a new typed array. read(into, elementOffset = 0): into.length elements from
// elementOffset into `into` (write's mirror), which it returns: a caller that reads the same
// tensor again and again (an adapter's state after every step) reuses its memory, e.g. a
// SharedArrayBuffer, instead of faulting in fresh pages each time.
Napi::Value JsTensor::Read(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  check_live(env, "read");
  if (info.Length() > 0 && !info[0].IsUndefined()) {
    if (dtype_quantized(impl.dtype))
      throw_js(env, std::string("Tensor.read: a ") + dtype_name(impl.dtype) + " tensor is read whole, by read()");
    auto [dst, at] = element_range(env, info, impl, "Tensor.read");
    DeviceState& dev = impl.device();
    std::lock_guard<std::mutex> lk(dev.exec_mutex());
    try {
      dev.backend().copy_to_host(dst.data, static_cast<const char*>(impl.data()) + at, dst.bytes);
    } catch (const std::exception& e) {
      throw_js(env, std::string("Tensor.read: ") + e.what(), code_of(e));
    }
    return info[0];
  }
  size_t n = size_t(impl.numel());
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, impl.nbytes());
  DeviceState& dev = impl.device();
  {
    std::lock_guard<std::mutex> lk(dev.exec_mutex());  // never read while a kernel writes
    // A CUDA copy can fail (and reports kernels' deferred errors): a JS Error, never a crash.
    try {
      dev.backend().copy_to_host(ab.Data(), impl.data(), impl.nbytes());
    } catch (const std::exception& e) {
      throw_js(env, std::string("Tensor.read: ") + e.what(), code_of(e));
    }
  }
  if (dtype_quantized(impl.dtype)) return Napi::Uint8Array::New(env, impl.nbytes(), ab, 0);
  switch (impl.dtype) {
    case DType::F32: return Napi::Float32Array::New(env, n, ab, 0);
    case DType::I32: return Napi::Int32Array::New(env, n, ab, 0);
    default: return Napi::Uint16Array::New(env, n, ab, 0);
  }
}

// write(typedArray, elementOffset = 0): copies into the tensor.
Napi::Value JsTensor::Write(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  check_live(env, "write");
  if (dtype_quantized(impl.dtype))
    throw_js(env, std::string("Tensor.write: a ") + dtype_name(impl.dtype) +
                      " tensor is written whole, by Device.fromArray or a quantize op");
  if (!impl.storage->panels.empty())  // the panels would go stale
    throw_js(env, "Tensor.write: this weight is frozen: Device.packWeights packed it for the GEMM", kErrBadInput);
  auto [src, at] = element_range(env, info, impl, "Tensor.write");
  DeviceState& dev = impl.device();
  std::lock_guard<std::mutex> lk(dev.exec_mutex());
  try {
    dev.backend().copy_from_host(static_cast<char*>(impl.data()) + at, src.data, src.bytes);
  } catch (const std::exception& e) {
    throw_js(env, std::string("Tensor.write: ") + e.what(), code_of(e));
  }
  return env.Undefined();
}

// rows(start, end): a view of rows [start, end) of dimension 0, sharing storage.
Napi::Value JsTensor::Rows(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  check_live(env, "rows");
  if (dtype_quantized(impl.dtype))
    throw_js(env, std::string("Tensor.rows: a ") + dtype_name(impl.dtype) + " tensor has no row views");
  int64_t s = integer_arg(env, info[0], "Tensor.rows(start, end): start", 0);
  int64_t e = integer_arg(env, info[1], "Tensor.rows(start, end): end", 0);
  if (e < s || e > impl.shape[0])
    throw_js(env,
             "Tensor.rows: range [" + std::to_string(s) + ", " + std::to_string(e) + ") is outside 0.." +
                 std::to_string(impl.shape[0]),
             kErrBadInput);
  TensorImpl v = impl;
  int64_t row = impl.numel() / std::max<int64_t>(1, impl.shape[0]);
  v.offset += size_t(s * row) * dtype_size(impl.dtype);
  v.shape[0] = e - s;
  return Make(env, v, keep_alive_.IsEmpty() ? env.Undefined() : keep_alive_.Value());
}

Napi::Value JsTensor::Reshape(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  check_live(env, "reshape");
  if (dtype_quantized(impl.dtype))
    throw_js(env, std::string("Tensor.reshape: a ") + dtype_name(impl.dtype) + " tensor keeps its shape");
  std::vector<int64_t> s = parse_shape(env, info[0], "Tensor.reshape");
  TensorImpl v = impl;
  v.shape = s;
  if (v.numel() != impl.numel())
    throw_js(env, "Tensor.reshape: " + v.shape_str() + " has " + std::to_string(v.numel()) + " elements, the tensor " +
                      impl.shape_str() + " has " + std::to_string(impl.numel()));
  return Make(env, v, keep_alive_.IsEmpty() ? env.Undefined() : keep_alive_.Value());
}

// free(): drops this handle's reference; the bytes return to the device budget as soon as no
// view and no running kernel holds the storage.
Napi::Value JsTensor::Free(const Napi::CallbackInfo& info) {
  if (!freed) {
    freed = true;
    impl.storage.reset();
    if (!keep_alive_.IsEmpty()) keep_alive_.Reset();
  }
  return info.Env().Undefined();
}

// ------------------------------------------------------------------------------------------
// Device

Napi::Function JsDevice::Init(Napi::Env env) {
  return DefineClass(env, "Device",
                     {
                         InstanceAccessor<&JsDevice::Name>("name"),
                         InstanceAccessor<&JsDevice::Kind>("kind"),
                         InstanceAccessor<&JsDevice::Threads>("threads"),
                         InstanceMethod<&JsDevice::Memory>("memory"),
                         InstanceMethod<&JsDevice::Alloc>("alloc"),
                         InstanceMethod<&JsDevice::FromArray>("fromArray"),
                         InstanceMethod<&JsDevice::Wrap>("wrap"),
                         InstanceMethod<&JsDevice::LoadFile>("loadFile"),
                         InstanceMethod<&JsDevice::Run>("run"),
                         InstanceMethod<&JsDevice::RunSync>("runSync"),
                         InstanceMethod<&JsDevice::TrimCache>("trimCache"),
                         InstanceMethod<&JsDevice::ResetPeak>("resetPeak"),
                         InstanceMethod<&JsDevice::OpProfile>("opProfile"),
                         InstanceMethod<&JsDevice::RunStats>("runStats"),
                         InstanceMethod<&JsDevice::PackWeights>("packWeights"),
                     });
}

// new Device({kind: 'cpu'|'cuda', index, threads, budget, cores}): budget in bytes; cores (CPU
// devices): one CPU id per thread to pin the compute threads to, or absent.
JsDevice::JsDevice(const Napi::CallbackInfo& info) : Napi::ObjectWrap<JsDevice>(info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject())
    throw_js(env, "new Device(options): options must be an object {kind, index, threads, budget}");
  Napi::Object o = info[0].As<Napi::Object>();
  std::string kind = o.Get("kind").IsString() ? o.Get("kind").As<Napi::String>().Utf8Value() : "cpu";
  auto num = [&](const char* k, double def) -> double {
    Napi::Value v = o.Get(k);
    return v.IsUndefined() ? def : double(integer_arg(env, v, std::string("new Device: '") + k + "'", 0));
  };
  int index = int(num("index", 0));
  int hw = int(std::max(1u, std::thread::hardware_concurrency()));
  int threads = int(num("threads", 1));
  if (threads < 1 || threads > 1024) throw_js(env, "new Device: 'threads' must be between 1 and 1024");
  if (kind == "cpu") {
    std::vector<int> cores;
    Napi::Value cv = o.Get("cores");
    if (!cv.IsUndefined()) {
      if (!cv.IsArray()) throw_js(env, "new Device: 'cores' must be an array of CPU ids, one per thread");
      Napi::Array ca = cv.As<Napi::Array>();
      if (int(ca.Length()) != threads)
        throw_js(env, "new Device: 'cores' has " + std::to_string(ca.Length()) + " CPU ids for " +
                          std::to_string(threads) + " threads (one per thread)");
      for (uint32_t i = 0; i < ca.Length(); i++)
        cores.push_back(int(integer_arg(env, ca.Get(i), "new Device: 'cores[" + std::to_string(i) + "]'", 0)));
      for (int c : cores)
        if (c >= CPU_SETSIZE) throw_js(env, "new Device: CPU id " + std::to_string(c) + " in 'cores' is out of range");
    }
    (void)hw;
    int64_t budget = int64_t(num("budget", double(int64_t(4) << 30)));
    if (budget <= 0) throw_js(env, "new Device: 'budget' must be positive (bytes)");
    state = std::make_shared<DeviceState>(DeviceKind::CPU, index, threads, budget, make_cpu_backend(), cores);
  } else if (kind == "cuda") {
    std::string why;
    auto be = make_cuda_backend(index, &why);
    if (!be) throw_js(env, "device cuda:" + std::to_string(index) + " is not available: " + why);
    int64_t free_b = be->free_memory();
    double def =
        free_b > 0 ? double(free_b - std::min<int64_t>(free_b / 10, int64_t(2) << 30)) : double(int64_t(4) << 30);
    int64_t budget = int64_t(num("budget", def));
    if (budget <= 0) throw_js(env, "new Device: 'budget' must be positive (bytes)");
    state = std::make_shared<DeviceState>(DeviceKind::CUDA, index, threads, budget, std::move(be));
  } else {
    throw_js(env, "new Device: unknown kind '" + kind + "' (cpu or cuda)");
  }
}

Napi::Value JsDevice::Name(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), state->name()); }
Napi::Value JsDevice::Kind(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), state->kind() == DeviceKind::CPU ? "cpu" : "cuda");
}
Napi::Value JsDevice::Threads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), state->pool().size());
}

Napi::Value JsDevice::Memory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  int64_t used = state->used();
  o.Set("budget", double(state->budget()));
  o.Set("used", double(used));
  o.Set("free", double(state->budget() - used));
  o.Set("cached", double(state->cached()));
  o.Set("peak", double(state->peak()));
  return o;
}

Napi::Value JsDevice::TrimCache(const Napi::CallbackInfo& info) {
  state->trim_cache();
  return info.Env().Undefined();
}
Napi::Value JsDevice::ResetPeak(const Napi::CallbackInfo& info) {
  state->reset_peak();
  return info.Env().Undefined();
}

// opProfile(reset = false): [{op, calls, ms}] summed since the last reset (MLORA_PROFILE_OPS);
// empty on a device that does not profile.
Napi::Value JsDevice::OpProfile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const bool reset = info.Length() > 0 && info[0].ToBoolean().Value();
  std::lock_guard<std::mutex> lk(state->exec_mutex());
  Napi::Array out = Napi::Array::New(env);
  uint32_t i = 0;
  for (auto& [key, t] : state->op_times()) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("op", key);
    o.Set("calls", double(t.calls));
    o.Set("ms", t.seconds * 1e3);
    out.Set(i++, o);
  }
  if (reset) state->op_times().clear();
  return out;
}

// runStats(reset = false): {runs, toLeaderMs, wallMs, cpuMs, backMs} of run() calls since the
// last reset (DeviceState::RunStats).
Napi::Value JsDevice::RunStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const bool reset = info.Length() > 0 && info[0].ToBoolean().Value();
  const DeviceState::RunStats r = state->run_stats(reset);
  Napi::Object o = Napi::Object::New(env);
  o.Set("runs", double(r.runs));
  o.Set("toLeaderMs", r.to_leader_s * 1e3);
  o.Set("wallMs", r.wall_s * 1e3);
  o.Set("cpuMs", r.cpu_s * 1e3);
  o.Set("backMs", r.back_s * 1e3);
  return o;
}

static TensorImpl new_tensor(Napi::Env env, const std::shared_ptr<DeviceState>& dev, DType dt,
                             std::vector<int64_t> shape, bool zero) {
  TensorImpl t;
  t.dtype = dt;
  t.shape = std::move(shape);
  if (dtype_quantized(dt) && t.shape.size() != 2)
    throw_js(env,
             std::string("a ") + dtype_name(dt) + " tensor is a 2-D weight [rows, cols], got shape " + t.shape_str());
  auto st = std::make_shared<Storage>();
  st->device = dev;
  st->bytes = t.nbytes();
  try {
    st->ptr = dev->allocate(st->bytes, zero);
  } catch (const Error& e) {
    st->ptr = nullptr;
    throw_js(env, e.what(), e.code);
  }
  t.storage = st;
  return t;
}

// alloc(dtype, shape, {zero = true})
Napi::Value JsDevice::Alloc(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  DType dt = parse_dtype(env, info[0], "Device.alloc");
  auto shape = parse_shape(env, info[1], "Device.alloc");
  bool zero = true;
  if (info.Length() > 2 && info[2].IsObject()) {
    Napi::Value z = info[2].As<Napi::Object>().Get("zero");
    if (z.IsBoolean()) zero = z.As<Napi::Boolean>().Value();
  }
  return JsTensor::Make(env, new_tensor(env, state, dt, shape, zero), env.Undefined());
}

// fromArray(dtype, shape, typedArray): a new device tensor holding a copy of the data.
Napi::Value JsDevice::FromArray(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  DType dt = parse_dtype(env, info[0], "Device.fromArray");
  auto shape = parse_shape(env, info[1], "Device.fromArray");
  TypedView src = typed_view(env, info[2], "Device.fromArray");
  if (!typed_array_matches(src.type, dt))
    throw_js(env, std::string("Device.fromArray: the typed array does not hold ") + dtype_name(dt) + " elements");
  TensorImpl t = new_tensor(env, state, dt, shape, false);
  if (dtype_quantized(dt) && src.bytes != t.nbytes())
    throw_js(env, "Device.fromArray: a " + std::string(dtype_name(dt)) + " " + t.shape_str() + " blob has " +
                      std::to_string(t.nbytes()) + " bytes, the array has " + std::to_string(src.bytes));
  if (src.bytes != t.nbytes())
    throw_js(env, "Device.fromArray: the array has " + std::to_string(src.bytes / dtype_size(dt)) +
                      " elements, shape " + t.shape_str() + " needs " + std::to_string(t.numel()));
  try {
    state->backend().copy_from_host(t.data(), src.data, src.bytes);
  } catch (const std::exception& e) {
    throw_js(env, std::string("Device.fromArray: ") + e.what(), code_of(e));
  }
  return JsTensor::Make(env, t, env.Undefined());
}

// wrap(typedArray, dtype, shape): zero-copy tensor over JS memory (e.g. a SharedArrayBuffer
// slot). CPU devices only. The tensor keeps the typed array alive.
Napi::Value JsDevice::Wrap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (state->kind() != DeviceKind::CPU) throw_js(env, "Device.wrap: only CPU devices can wrap JavaScript memory");
  TypedView src = typed_view(env, info[0], "Device.wrap");
  DType dt = parse_dtype(env, info[1], "Device.wrap");
  auto shape = parse_shape(env, info[2], "Device.wrap");
  if (dtype_quantized(dt)) throw_js(env, "Device.wrap: quantized tensors are made by fromArray or a quantize op");
  TensorImpl t;
  t.dtype = dt;
  t.shape = shape;
  if (t.nbytes() > src.bytes)
    throw_js(env, "Device.wrap: shape " + t.shape_str() + " " + dtype_name(dt) + " needs " +
                      std::to_string(t.nbytes()) + " bytes, the array has " + std::to_string(src.bytes));
  if (reinterpret_cast<uintptr_t>(src.data) % dtype_size(dt) != 0)
    throw_js(env, "Device.wrap: the array's byte offset is not aligned to its dtype");
  auto st = std::make_shared<Storage>();
  st->device = state;
  st->ptr = src.data;
  st->bytes = src.bytes;
  st->borrowed = true;
  t.storage = st;
  return JsTensor::Make(env, t, info[0]);
}

// An AsyncWorker that settles a promise: resolved by the subclass's OnOK, rejected with the error
// of SetError. During environment teardown (a worker or the process exiting) JS can no longer
// run: settling the promise then fails, and that must not escape as a C++ exception.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  explicit PromiseWorker(Napi::Env env) : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void OnError(const Napi::Error& e) override { settle(false, e.Value()); }

 protected:
  void settle(bool ok, Napi::Value v) {
    try {
      if (ok)
        deferred_.Resolve(v);
      else
        deferred_.Reject(v);
    } catch (...) {
    }
  }

 private:
  Napi::Promise::Deferred deferred_;
};

// loadFile(path, byteOffset, dtype, shape): reads a tensor straight from a file into device
// memory (for safetensors), so a large checkpoint never passes through JS memory. Async.
class LoadFileWorker : public PromiseWorker {
 public:
  LoadFileWorker(Napi::Env env, std::string path, int64_t offset, TensorImpl t)
      : PromiseWorker(env), path_(std::move(path)), offset_(offset), t_(std::move(t)) {}
  void Execute() override {
    int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return SetError(path_ + ": " + std::strerror(errno));
    size_t want = t_.nbytes();
    std::vector<char> host;
    bool direct = t_.device().kind() == DeviceKind::CPU;
    char* dst = static_cast<char*>(t_.data());
    if (!direct) {
      host.resize(want);
      dst = host.data();
    }
    size_t got = 0;
    while (got < want) {
      ssize_t r = ::pread(fd, dst + got, want - got, off_t(offset_ + int64_t(got)));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        ::close(fd);
        return SetError(path_ + ": short read at byte " + std::to_string(offset_ + int64_t(got)) + " (wanted " +
                        std::to_string(want) + " bytes from offset " + std::to_string(offset_) + ")");
      }
      got += size_t(r);
    }
    ::close(fd);
    if (!direct) {
      std::lock_guard<std::mutex> lk(t_.device().exec_mutex());
      t_.device().backend().copy_from_host(t_.data(), host.data(), want);
      t_.device().backend().synchronize();
    }
  }
  void OnOK() override {
    try {
      settle(true, JsTensor::Make(Env(), t_, Env().Undefined()));
    } catch (...) {  // making the tensor's handle needs JS too
    }
  }

 private:
  std::string path_;
  int64_t offset_;
  TensorImpl t_;
};

Napi::Value JsDevice::LoadFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw_js(env, "Device.loadFile(path, offset, dtype, shape): path must be a string");
  int64_t off = integer_arg(env, info[1], "Device.loadFile: offset", 0);
  DType dt = parse_dtype(env, info[2], "Device.loadFile");
  if (dtype_quantized(dt)) throw_js(env, "Device.loadFile: quantized tensors are made by fromArray or a quantize op");
  auto shape = parse_shape(env, info[3], "Device.loadFile");
  TensorImpl t = new_tensor(env, state, dt, shape, false);
  auto* w = new LoadFileWorker(env, info[0].As<Napi::String>().Utf8Value(), off, t);
  auto p = w->Promise();
  w->Queue();
  return p;
}

// ---- running ops

struct ParsedOps {
  std::vector<Kernel> kernels;
  std::vector<std::string> labels;
  std::vector<std::string> profile_keys;  // only on a profiling device
};

// What a profiling device sums an op's time under: its name, "+lora" when it carries LoRA
// segments, and a linear op's weight shape (projections and the LM head apart).
static std::string profile_key(const std::string& name, Napi::Object o) {
  std::string key = name;
  Napi::Value segs = o.Get("segments");
  if (segs.IsArray() && segs.As<Napi::Array>().Length() > 0) key += "+lora";
  if (name.rfind("linear_", 0) == 0 && o.Get("w").IsObject()) {
    JsTensor* jt = JsTensor::Unwrap(o.Get("w"));
    if (!jt) return key;
    const TensorImpl& w = jt->impl;
    key += " w[";
    for (size_t d = 0; d < w.shape.size(); d++) key += (d ? "x" : "") + std::to_string(w.shape[d]);
    key += "]";
  }
  return key;
}

static ParsedOps parse_ops(Napi::Env env, DeviceState* dev, Napi::Value v) {
  if (!v.IsArray()) throw_js(env, "Device.run(ops): ops must be an array of op objects");
  Napi::Array arr = v.As<Napi::Array>();
  ParsedOps out;
  for (uint32_t i = 0; i < arr.Length(); i++) {
    Napi::Value e = arr.Get(i);
    std::string ctx = "op " + std::to_string(i);
    if (!e.IsObject()) throw_js(env, ctx + ": not an object");
    Napi::Object o = e.As<Napi::Object>();
    Napi::Value name = o.Get("op");
    if (!name.IsString()) throw_js(env, ctx + ": missing 'op' (the op name)");
    std::string n = name.As<Napi::String>().Utf8Value();
    Parser p = find_op(n);
    if (!p) throw_js(env, ctx + ": unknown op '" + n + "'");
    ctx += " (" + n + ")";
    Args args(env, o, ctx, dev);
    try {
      out.kernels.push_back(p(args));
    } catch (const Error& err) {
      throw_js(env, err.what(), err.code);
    }
    out.labels.push_back(ctx);
    if (dev->profiling()) out.profile_keys.push_back(profile_key(n, o));
  }
  return out;
}

struct RunFailure {
  std::string message;  // empty: the ops ran
  const char* code = nullptr;
};

static RunFailure run_kernels(DeviceState& dev, ParsedOps& ops) {
  std::lock_guard<std::mutex> lk(dev.exec_mutex());
  Exec ex{dev};
  const bool prof = dev.profiling();
  for (size_t i = 0; i < ops.kernels.size(); i++) {
    try {
      if (!prof) {
        ops.kernels[i](ex);
        continue;
      }
      const auto t0 = std::chrono::steady_clock::now();
      ops.kernels[i](ex);
      dev.backend().synchronize();
      DeviceState::OpTime& t = dev.op_times()[ops.profile_keys[i]];
      t.calls++;
      t.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } catch (const std::bad_alloc&) {
      return {ops.labels[i] + ": out of host memory", kErrOutOfMemory};
    } catch (const std::exception& err) {
      return {ops.labels[i] + ": " + err.what(), code_of(err)};
    }
  }
  try {
    dev.backend().synchronize();
  } catch (const std::exception& err) {
    return {std::string("synchronize: ") + err.what(), code_of(err)};
  }
  return {};
}

// One op list's trip: timed where RunStats wants it (DeviceState::RunStats says what each part
// is), run on the leader (or inline where the device has none), accounted on the JS thread.
struct RunTrip {
  using Clock = std::chrono::steady_clock;
  Clock::time_point queued = Clock::now(), start = queued, end = queued;
  DeviceState::RunStats stats;
  RunFailure failure;

  void execute(DeviceState& dev, ParsedOps& ops) {
    start = Clock::now();
    const double cpu0 = thread_cpu_seconds();
    failure = run_kernels(dev, ops);
    stats.cpu_s = thread_cpu_seconds() - cpu0;
    end = Clock::now();
  }
  void account(DeviceState& dev) {
    stats.runs = 1;
    stats.to_leader_s = seconds(start - queued);
    stats.wall_s = seconds(end - start);
    stats.back_s = seconds(Clock::now() - end);
    dev.add_run(stats);
  }

 private:
  static double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }
  static double thread_cpu_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
  }
};

// A device without a leader thread (CUDA): the op list runs on a libuv thread.
class RunWorker : public PromiseWorker {
 public:
  RunWorker(Napi::Env env, std::shared_ptr<DeviceState> dev, ParsedOps ops, Napi::Value keep)
      : PromiseWorker(env), dev_(std::move(dev)), ops_(std::move(ops)) {
    keep_ = Napi::Persistent(keep.As<Napi::Object>());  // the op objects keep their tensors alive
  }
  void Execute() override {
    trip_.execute(*dev_, ops_);
    if (!trip_.failure.message.empty()) SetError(trip_.failure.message);
  }
  void OnOK() override {
    trip_.account(*dev_);
    ops_.kernels.clear();
    settle(true, Env().Undefined());
  }
  void OnError(const Napi::Error& e) override {
    trip_.account(*dev_);
    ops_.kernels.clear();
    try {
      if (trip_.failure.code) e.Value().Set("code", Napi::String::New(Env(), trip_.failure.code));
    } catch (...) {  // environment teardown
    }
    settle(false, e.Value());
  }

 private:
  std::shared_ptr<DeviceState> dev_;
  ParsedOps ops_;
  Napi::ObjectReference keep_;
  RunTrip trip_;
};

// A CPU device: the op list goes from this JS thread straight to the device's leader thread
// (ThreadPool::post_to_leader, first in, first out) and its end straight back (the environment's
// thread-safe function, AddonData::run_done). Through a libuv thread instead, each run took two
// more wake-ups, on threads that all of the process's stages share: one that last ran on the
// core of another stage's busy compute thread woke there and waited for a time slice, while
// this stage's core idled. The leader wakes where it last ran.
struct LeaderRun {
  std::shared_ptr<DeviceState> dev;
  ParsedOps ops;
  napi_deferred deferred = nullptr;
  Napi::ObjectReference keep;  // the op objects keep their tensors alive
  RunTrip trip;
};

namespace {
// On the JS thread (env null: the environment is going away and the run's promise with it).
void run_done(napi_env env, napi_value, void* context, void* data) {
  auto* run = static_cast<LeaderRun*>(data);
  auto* d = static_cast<AddonData*>(context);
  if (!env) {
    run->keep.SuppressDestruct();  // its environment has freed the reference
    delete run;
    return;
  }
  Napi::Env e(env);
  Napi::HandleScope scope(e);
  run->trip.account(*run->dev);
  run->ops.kernels.clear();
  const RunFailure& f = run->trip.failure;
  if (f.message.empty()) {
    napi_resolve_deferred(env, run->deferred, e.Undefined());
  } else {
    Napi::Error err = Napi::Error::New(e, f.message);
    if (f.code) err.Value().Set("code", Napi::String::New(e, f.code));
    napi_reject_deferred(env, run->deferred, err.Value());
  }
  delete run;
  if (--d->runs_pending == 0) napi_unref_threadsafe_function(env, d->run_done);
}

// The environment ends (a worker thread exits or is terminated): the runs still on a leader are
// waited for, since their kernels read and write memory this environment owns.
void wait_for_leaders(void* arg) {
  auto* d = static_cast<AddonData*>(arg);
  std::unique_lock<std::mutex> lk(d->leader_mu);
  d->leader_cv.wait(lk, [&] { return d->on_leader == 0; });
}

Napi::Promise post_run(Napi::Env env, const std::shared_ptr<DeviceState>& dev, ParsedOps ops, Napi::Value keep) {
  AddonData* d = data_of(env);
  if (!d->run_done) {
    napi_status st = napi_create_threadsafe_function(env, nullptr, nullptr, Napi::String::New(env, "mlora run"), 0, 1,
                                                     nullptr, nullptr, d, run_done, &d->run_done);
    if (st != napi_ok) throw_js(env, "Device.run: cannot make the thread-safe function for op lists");
    napi_unref_threadsafe_function(env, d->run_done);
    napi_add_env_cleanup_hook(env, wait_for_leaders, d);
  }
  auto* run = new LeaderRun{dev, std::move(ops), nullptr, Napi::Persistent(keep.As<Napi::Object>()), {}};
  napi_value promise;
  napi_create_promise(env, &run->deferred, &promise);
  if (d->runs_pending++ == 0) napi_ref_threadsafe_function(env, d->run_done);
  {
    std::lock_guard<std::mutex> lk(d->leader_mu);
    d->on_leader++;
  }
  dev->pool().post_to_leader([run, d] {
    run->trip.execute(*run->dev, run->ops);
    // once handed over, the run belongs to the JS thread; only when the environment is already
    // closing is it refused (and its kernels' memory stays with the run: freed at exit)
    napi_call_threadsafe_function(d->run_done, run, napi_tsfn_nonblocking);
    std::lock_guard<std::mutex> lk(d->leader_mu);
    if (--d->on_leader == 0) d->leader_cv.notify_all();
  });
  return Napi::Promise(env, promise);
}
}  // namespace

// run(ops): checks every op now (throws synchronously on bad arguments), runs them in order
// off the JS thread, resolves when done.
Napi::Value JsDevice::Run(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ParsedOps ops = parse_ops(env, state.get(), info[0]);
  if (state->pool().has_leader()) return post_run(env, state, std::move(ops), info[0]);
  auto* w = new RunWorker(env, state, std::move(ops), info[0]);
  auto p = w->Promise();
  w->Queue();
  return p;
}

// packWeights(weights, {bf16 = false}): packs each frozen 2-D weight [out, in] once into the
// panels of its two GEMMs (linear_forward and linear_backward; cpu::gemm_pack_panels), so those
// ops stop packing it on every call. Resolves to the bytes the panels take on the device (as
// the budget counts them). The panels are attached only once complete, on this thread, so an op
// list checked before then packs as before; they live and go with the weight, which can no
// longer be written. bf16: for ops with bf16 compute (another layout). A weight already packed
// for that compute is skipped. CPU devices only. All-or-nothing on out of memory.
class PackWorker : public PromiseWorker {
 public:
  struct Job {
    TensorImpl w;
    bool forward;
    TensorImpl panels;
  };
  PackWorker(Napi::Env env, std::shared_ptr<DeviceState> dev, std::vector<Job> jobs, bool bf16)
      : PromiseWorker(env), dev_(std::move(dev)), jobs_(std::move(jobs)), bf16_(bf16) {}
  void Execute() override {
    std::string err;
    dev_->pool().run_on_leader([&] {
      Exec ex{*dev_};
      try {
        for (const Job& j : jobs_) {
          WeightRef w = weight(j.w);
          w.bf16_compute = bf16_;
          cpu::gemm_pack_panels(ex, j.panels.as<float>(), w, j.forward, j.w.shape[0], j.w.shape[1]);
        }
      } catch (const std::bad_alloc&) {
        err = "packWeights: out of host memory";
      } catch (const std::exception& e) {
        err = std::string("packWeights: ") + e.what();
      }
    });
    if (!err.empty()) SetError(err);
  }
  void OnOK() override {
    double bytes = 0;
    for (const Job& j : jobs_) {
      j.w.storage->panels.push_back(
          WeightPanels{j.w.offset, j.w.dtype, j.w.shape[0], j.w.shape[1], j.forward, bf16_, j.panels.storage});
      bytes += double(DeviceState::counted_bytes(j.panels.storage->bytes));
    }
    try {
      settle(true, Napi::Number::New(Env(), bytes));
    } catch (...) {  // making the number needs JS too
    }
  }

 private:
  std::shared_ptr<DeviceState> dev_;
  std::vector<Job> jobs_;
  bool bf16_;
};

Napi::Value JsDevice::PackWeights(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* what = "Device.packWeights(weights, {bf16})";
  if (state->kind() != DeviceKind::CPU)
    throw_js(env, std::string(what) + ": " + state->name() + " is not a CPU device (only the CPU GEMM packs weights)",
             kErrBadInput);
  if (!info[0].IsArray()) throw_js(env, std::string(what) + ": weights must be an array of Tensors", kErrBadInput);
  bool bf16 = false;
  if (info.Length() > 1 && info[1].IsObject()) bf16 = info[1].As<Napi::Object>().Get("bf16").ToBoolean().Value();
  Napi::Array arr = info[0].As<Napi::Array>();
  std::vector<PackWorker::Job> jobs;
  for (uint32_t i = 0; i < arr.Length(); i++) {
    const std::string name = std::string(what) + ": weights[" + std::to_string(i) + "]";
    JsTensor* t = JsTensor::Unwrap(arr.Get(i));
    if (!t) throw_js(env, name + " is not a Tensor", kErrBadInput);
    if (t->freed) throw_js(env, name + " has been freed", kErrBadInput);
    const TensorImpl& w = t->impl;
    if (w.storage->device != state)
      throw_js(env, name + " is on " + w.device().name() + ", not " + state->name(), kErrBadInput);
    if (w.shape.size() != 2 || w.shape[0] <= 0 || w.shape[1] <= 0)
      throw_js(env, name + " must be a 2-D weight [out, in], got " + w.shape_str(), kErrBadInput);
    if (w.dtype == DType::I32) throw_js(env, name + " is i32, not a weight", kErrBadInput);
    for (bool forward : {true, false}) {
      bool have = find_panels(w, forward, bf16) != nullptr;
      for (const PackWorker::Job& j : jobs)  // the same weight twice in the list
        have |= j.w.storage == w.storage && j.w.offset == w.offset && j.forward == forward;
      if (!have) jobs.push_back({w, forward, {}});
    }
  }
  for (PackWorker::Job& j : jobs) {  // all allocations before any packing: none or all
    const int64_t floats = cpu::gemm_panel_floats(j.forward, j.w.shape[0], j.w.shape[1], bf16);
    j.panels = new_tensor(env, state, DType::F32, {floats}, false);
  }
  auto* wk = new PackWorker(env, state, std::move(jobs), bf16);
  auto p = wk->Promise();
  wk->Queue();
  return p;
}

// runSync(ops): the same on the calling thread (tests, tiny ops).
Napi::Value JsDevice::RunSync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ParsedOps ops = parse_ops(env, state.get(), info[0]);
  RunFailure f = run_kernels(*state, ops);
  if (!f.message.empty()) throw_js(env, f.message, f.code);
  return env.Undefined();
}

// ------------------------------------------------------------------------------------------
// Module

// checksum(words, seed): cpu/checksum.h's slot checksum of an Int32Array (any buffer, shared
// ones included), as an int32 like the slot header that holds it.
static Napi::Value Checksum(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    throw_js(env, "checksum(words, seed): words must be an Int32Array");
  const int64_t seed = integer_arg(env, info[1], "checksum(words, seed): seed", INT32_MIN);
  if (seed > INT32_MAX) throw_js(env, "checksum(words, seed): seed must be an int32, got " + std::to_string(seed));
  Napi::Int32Array w = info[0].As<Napi::Int32Array>();
  const uint32_t h = cpu::slot_checksum(reinterpret_cast<const uint32_t*>(w.Data()), w.ElementLength(), uint32_t(seed));
  return Napi::Number::New(env, double(int32_t(h)));
}

// nameThread(name): names the calling thread in /proc (15 characters kept), so a per-thread CPU
// account tells a stage actor's JavaScript thread from the others.
static Napi::Value NameThread(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw_js(env, "nameThread(name): name must be a string");
  pthread_setname_np(pthread_self(), info[0].As<Napi::String>().Utf8Value().substr(0, 15).c_str());
  return env.Undefined();
}

// pinThread(cores): the calling thread may run only on these CPUs (a pinned stage's JS thread
// shares its compute thread's core: the stage's JS then runs when its own kernels are not, and
// never takes the core of the neighbour stage). False when the kernel refused (a CPU outside
// the process's affinity mask): the thread then stays where it was.
static Napi::Value PinThread(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* what = "pinThread(cores): cores must be a non-empty array of CPU ids";
  if (!info[0].IsArray()) throw_js(env, what);
  Napi::Array a = info[0].As<Napi::Array>();
  if (a.Length() == 0) throw_js(env, what);
  cpu_set_t set;
  CPU_ZERO(&set);
  for (uint32_t i = 0; i < a.Length(); i++) {
    const std::string name = "pinThread(cores): cores[" + std::to_string(i) + "]";
    const int64_t c = integer_arg(env, a.Get(i), name, 0);
    if (c >= CPU_SETSIZE)
      throw_js(env, name + " must be below " + std::to_string(CPU_SETSIZE) + ", got " + std::to_string(c));
    CPU_SET(int(c), &set);
  }
  return Napi::Boolean::New(env, sched_setaffinity(0, sizeof set, &set) == 0);
}

// gemmPanelBytes(out, in, bf16 = false): the bytes Device.packWeights takes on a CPU device for
// a weight [out, in] (both panels, as the budget counts them), for memory plans.
static Napi::Value GemmPanelBytes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int64_t out = integer_arg(env, info[0], "gemmPanelBytes(out, in, bf16): out", 1);
  const int64_t in = integer_arg(env, info[1], "gemmPanelBytes(out, in, bf16): in", 1);
  const bool bf16 = info.Length() > 2 && info[2].ToBoolean().Value();
  double bytes = 0;
  for (bool forward : {true, false})
    bytes += double(DeviceState::counted_bytes(size_t(cpu::gemm_panel_floats(forward, out, in, bf16)) * 4));
  return Napi::Number::New(env, bytes);
}

static Napi::Value Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  CpuFeatures f = cpu_features();
  Napi::Object cpu = Napi::Object::New(env);
  cpu.Set("avx2", f.avx2 && f.fma);
  cpu.Set("avx512f", f.avx512f);
  cpu.Set("avx512bf16", f.avx512bf16);
  cpu.Set("amxBf16", f.amx_bf16);
  cpu.Set("f16c", f.f16c);
  cpu.Set("hardwareThreads", double(std::max(1u, std::thread::hardware_concurrency())));
  Napi::Array allowed = Napi::Array::New(env);  // the CPUs this process may run on (taskset, cgroup cpuset)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0)
    for (int c = 0, k = 0; c < CPU_SETSIZE; c++)
      if (CPU_ISSET(c, &set)) allowed.Set(uint32_t(k++), c);
  cpu.Set("allowedCores", allowed);
  cpu.Set("gemmKernel", cpu_gemm_kernel_name());
  cpu.Set("gemmBf16Kernel", cpu_gemm_bf16_kernel_name());
  o.Set("cpu", cpu);
  Napi::Object cu = Napi::Object::New(env);
  std::string why;
  int n = cuda_device_count(&why);
  cu.Set("compiled", cuda_compiled());
  cu.Set("devices", n);
  cu.Set("reason", why);
  cu.Set("gemm", cuda_gemm_info());
  o.Set("cuda", cu);
  Napi::Array ops = Napi::Array::New(env);
  uint32_t i = 0;
  for (auto& name : op_names()) ops.Set(i++, name);
  o.Set("ops", ops);
  return o;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* d = new AddonData();
  env.SetInstanceData<AddonData>(d);
  Napi::Function tensor = JsTensor::Init(env);
  Napi::Function device = JsDevice::Init(env);
  d->tensor_ctor = Napi::Persistent(tensor);
  d->device_ctor = Napi::Persistent(device);
  exports.Set("Tensor", tensor);
  exports.Set("Device", device);
  exports.Set("info", Napi::Function::New(env, Info, "info"));
  exports.Set("nameThread", Napi::Function::New(env, NameThread, "nameThread"));
  exports.Set("pinThread", Napi::Function::New(env, PinThread, "pinThread"));
  exports.Set("checksum", Napi::Function::New(env, Checksum, "checksum"));
  exports.Set("gemmPanelBytes", Napi::Function::New(env, GemmPanelBytes, "gemmPanelBytes"));
  exports.Set("gemmPackedBWords", Napi::Function::New(
                                      env,
                                      [](const Napi::CallbackInfo& info) -> Napi::Value {
                                        return Napi::Number::New(info.Env(), double(cpu_gemm_packed_b_words()));
                                      },
                                      "gemmPackedBWords"));
  return exports;
}

}  // namespace mlora

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return mlora::Init(env, exports); }
NODE_API_MODULE(mlora, InitAddon)

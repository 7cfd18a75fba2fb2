#include "op.h"

#include <cmath>
#include <map>
#include <sstream>

#include "../addon.h"

namespace mlora {

namespace {
// Written only during static initialisation, read-only afterwards: safe across worker threads.
std::map<std::string, Parser>& table() {
  static std::map<std::string, Parser> t;
  return t;
}

std::string shape_to_string(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); i++) o << (i ? "," : "") << (s[i] < 0 ? std::string("*") : std::to_string(s[i]));
  o << "]";
  return o.str();
}

std::string number_text(double d) {
  std::ostringstream o;
  o << d;
  return o.str();
}
}  // namespace

void register_op(const char* name, Parser parser) { table()[name] = parser; }
Parser find_op(const std::string& name) {
  auto it = table().find(name);
  return it == table().end() ? nullptr : it->second;
}
std::vector<std::string> op_names() {
  std::vector<std::string> v;
  for (auto& kv : table()) v.push_back(kv.first);
  return v;
}

void Args::fail(const std::string& msg) const { throw Error(ctx_ + ": " + msg, kErrBadInput); }

double js_number(Napi::Value v, const std::string& what) {
  if (!v.IsNumber()) throw Error(what + " must be a number", kErrBadInput);
  double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d)) throw Error(what + " must be finite, got " + number_text(d), kErrBadInput);
  return d;
}

int64_t js_integer(Napi::Value v, const std::string& what, int64_t min) {
  double d = js_number(v, what);
  if (d != std::floor(d) || std::fabs(d) > 9007199254740991.0)
    throw Error(what + " must be " + (min == 0 ? "a non-negative integer" : "an integer") + ", got " + number_text(d),
                kErrBadInput);
  if (int64_t(d) < min)
    throw Error(what + " must be " + (min == 0 ? "a non-negative integer" : "an integer >= " + std::to_string(min)) +
                    ", got " + number_text(d),
                kErrBadInput);
  return int64_t(d);
}

Napi::Value Args::get(const char* name) const { return obj_.Get(name); }

bool Args::has(const char* name) const {
  Napi::Value v = get(name);
  return !v.IsUndefined() && !v.IsNull();
}

TensorImpl Args::tensor(const char* name, std::initializer_list<DType> allowed) {
  return tensor_value(get(name), name, allowed);
}

std::vector<TensorImpl> Args::tensor_list(const char* name, std::initializer_list<DType> allowed) {
  Napi::Value v = get(name);
  if (!v.IsArray()) fail(std::string("argument '") + name + "' must be an array of Tensors");
  Napi::Array arr = v.As<Napi::Array>();
  std::vector<TensorImpl> out;
  for (uint32_t i = 0; i < arr.Length(); i++) {
    std::string n = std::string(name) + "[" + std::to_string(i) + "]";
    out.push_back(tensor_value(arr.Get(i), n.c_str(), allowed));
  }
  return out;
}

TensorImpl Args::tensor_value(Napi::Value v, const char* name, std::initializer_list<DType> allowed) {
  if (v.IsUndefined() || v.IsNull()) fail(std::string("argument '") + name + "' is missing (expected a Tensor)");
  JsTensor* t = JsTensor::Unwrap(v);
  if (!t) fail(std::string("argument '") + name + "' is not a Tensor");
  if (t->freed) fail(std::string("argument '") + name + "' is a freed tensor");
  if (dev_ && t->impl.storage->device.get() != dev_)
    fail(std::string("argument '") + name + "' lives on " + t->impl.storage->device->name() + ", not on " +
         dev_->name());
  bool ok = false;
  std::string names;
  for (DType d : allowed) {
    if (d == t->impl.dtype) ok = true;
    names += (names.empty() ? "" : "|") + std::string(dtype_name(d));
  }
  if (!ok) fail(std::string("argument '") + name + "' has dtype " + dtype_name(t->impl.dtype) + ", expected " + names);
  return t->impl;
}

double Args::number(const char* name) { return js_number(get(name), ctx_ + ": argument '" + name + "'"); }
double Args::number(const char* name, double fallback) { return has(name) ? number(name) : fallback; }

int64_t Args::integer(const char* name) { return js_integer(get(name), ctx_ + ": argument '" + name + "'"); }
int64_t Args::integer(const char* name, int64_t fallback) { return has(name) ? integer(name) : fallback; }

bool Args::flag(const char* name, bool fallback) {
  Napi::Value v = get(name);
  if (v.IsUndefined() || v.IsNull()) return fallback;
  if (!v.IsBoolean()) fail(std::string("argument '") + name + "' must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

std::vector<Args> Args::list(const char* name) {
  Napi::Value v = get(name);
  if (!v.IsArray()) fail(std::string("argument '") + name + "' must be an array");
  Napi::Array arr = v.As<Napi::Array>();
  std::vector<Args> out;
  for (uint32_t i = 0; i < arr.Length(); i++) {
    Napi::Value e = arr.Get(i);
    if (!e.IsObject()) fail(std::string("argument '") + name + "[" + std::to_string(i) + "]' must be an object");
    out.emplace_back(env_, e.As<Napi::Object>(), ctx_ + ": " + name + "[" + std::to_string(i) + "]", dev_);
  }
  return out;
}

void Args::expect_shape(const char* name, const TensorImpl& t, std::vector<int64_t> expect) {
  bool ok = t.shape.size() == expect.size();
  for (size_t i = 0; ok && i < expect.size(); i++)
    if (expect[i] >= 0 && expect[i] != t.shape[i]) ok = false;
  if (!ok)
    fail(std::string("argument '") + name + "' has shape " + t.shape_str() + ", expected " + shape_to_string(expect));
}

void Args::expect_numel(const char* name, const TensorImpl& t, int64_t n) {
  if (t.numel() != n)
    fail(std::string("argument '") + name + "' has " + std::to_string(t.numel()) + " elements " + t.shape_str() +
         ", expected " + std::to_string(n));
}

void Args::expect_distinct(const char* a, const TensorImpl& ta, const char* b, const TensorImpl& tb) {
  const char* pa = static_cast<const char*>(ta.data());
  const char* pb = static_cast<const char*>(tb.data());
  if (pa < pb + tb.nbytes() && pb < pa + ta.nbytes())
    fail(std::string("arguments '") + a + "' and '" + b + "' overlap in memory; they must be distinct");
}

void Args::expect_outputs_distinct(std::initializer_list<Named> outputs, std::initializer_list<Named> inputs) {
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    for (auto p = o + 1; p != outputs.end(); ++p) expect_distinct(o->first, *o->second, p->first, *p->second);
    for (const Named& i : inputs) expect_distinct(o->first, *o->second, i.first, *i.second);
  }
}

}  // namespace mlora

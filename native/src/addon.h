// The JavaScript handles: Device and Tensor. Declared here so the op parsers (ops/*.cc) can
// recognise a Tensor argument; everything else about the N-API surface is in addon.cc.
#pragma once
#include <napi.h>

#include <condition_variable>
#include <memory>
#include <mutex>

#include "core/device.h"

namespace mlora {

// Per-addon-instance state (the addon is loaded once per worker thread): no globals.
struct AddonData {
  Napi::FunctionReference tensor_ctor;
  Napi::FunctionReference device_ctor;
  // Op lists run on a CPU device's leader thread come back through this (addon.cc, post_run).
  napi_threadsafe_function run_done = nullptr;
  int runs_pending = 0;  // JS thread only: the function keeps the event loop alive while > 0
  std::mutex leader_mu;
  std::condition_variable leader_cv;
  int on_leader = 0;  // runs not yet handed back (the environment's cleanup waits for them)
};

class JsTensor : public Napi::ObjectWrap<JsTensor> {
 public:
  static Napi::Function Init(Napi::Env env);
  static Napi::Object Make(Napi::Env env, TensorImpl impl, Napi::Value keep_alive);
  static JsTensor* Unwrap(Napi::Value v);  // nullptr if v is not a Tensor of this addon instance
  explicit JsTensor(const Napi::CallbackInfo& info);

  TensorImpl impl;
  bool freed = false;

 private:
  Napi::Value Dtype(const Napi::CallbackInfo& info);
  Napi::Value Shape(const Napi::CallbackInfo& info);
  Napi::Value Bytes(const Napi::CallbackInfo& info);
  Napi::Value DeviceName(const Napi::CallbackInfo& info);
  Napi::Value Freed(const Napi::CallbackInfo& info);
  Napi::Value Borrowed(const Napi::CallbackInfo& info);
  Napi::Value Read(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value Rows(const Napi::CallbackInfo& info);
  Napi::Value Reshape(const Napi::CallbackInfo& info);
  Napi::Value Free(const Napi::CallbackInfo& info);
  void check_live(Napi::Env env, const char* what);

  Napi::ObjectReference keep_alive_;  // the JS buffer a borrowed tensor points into
};

class JsDevice : public Napi::ObjectWrap<JsDevice> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit JsDevice(const Napi::CallbackInfo& info);
  std::shared_ptr<DeviceState> state;

 private:
  Napi::Value Name(const Napi::CallbackInfo& info);
  Napi::Value Kind(const Napi::CallbackInfo& info);
  Napi::Value Threads(const Napi::CallbackInfo& info);
  Napi::Value Memory(const Napi::CallbackInfo& info);
  Napi::Value Alloc(const Napi::CallbackInfo& info);
  Napi::Value FromArray(const Napi::CallbackInfo& info);
  Napi::Value Wrap(const Napi::CallbackInfo& info);
  Napi::Value LoadFile(const Napi::CallbackInfo& info);
  Napi::Value Run(const Napi::CallbackInfo& info);
  Napi::Value RunSync(const Napi::CallbackInfo& info);
  Napi::Value TrimCache(const Napi::CallbackInfo& info);
  Napi::Value ResetPeak(const Napi::CallbackInfo& info);
  Napi::Value OpProfile(const Napi::CallbackInfo& info);
  Napi::Value RunStats(const Napi::CallbackInfo& info);
  Napi::Value PackWeights(const Napi::CallbackInfo& info);
};

}  // namespace mlora

// What a kernel is given besides its tensors: the device it runs on, its compute threads
// and (on CUDA) its stream.
#pragma once
#include "device.h"

namespace mlora {

struct Exec {
  DeviceState& dev;
  ThreadPool& pool() const { return dev.pool(); }
  bool cuda() const { return dev.kind() == DeviceKind::CUDA; }
  void* stream() const { return dev.backend().stream(); }
};

}  // namespace mlora

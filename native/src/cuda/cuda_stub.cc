// Linked where nvcc was not found at build time: the CUDA backend reports itself absent.
#include "../core/device.h"

namespace mlora {

bool cuda_compiled() { return false; }
int cuda_device_count(std::string* why) {
  *why = "this build has no CUDA backend (nvcc was not found, or MLORA_NO_CUDA=1 was set, when the addon was built)";
  return 0;
}
std::string cuda_gemm_info() { return "none (no CUDA backend in this build)"; }
std::unique_ptr<Backend> make_cuda_backend(int, std::string* why) {
  cuda_device_count(why);
  return nullptr;
}

}  // namespace mlora

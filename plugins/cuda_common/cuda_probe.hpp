#pragma once
// Shared by the GPU plugins (a header, not a plugin): why no CUDA device can be used here,
// in the words `switchyard plugins` shows.
#include <cuda_runtime.h>

#include <string>

#include "switchyard/status.hpp"

namespace switchyard::cuda_common {

inline std::string cuda_version_text(int version) {
  if (version == 0) return "none";
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

/// Empty when a CUDA device is usable; otherwise why not ("no CUDA device is usable: ...").
inline std::string cuda_unusable_reason() {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  const std::string error = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  if (e == cudaErrorInsufficientDriver && driver == 0) {
    return "no CUDA device is usable: no NVIDIA driver is loaded (" + error + ")";
  }
  if (e == cudaErrorInsufficientDriver) {
    return "no CUDA device is usable: the driver (CUDA " + cuda_version_text(driver) +
           ") is older than the toolkit this plugin was built with (CUDA " +
           cuda_version_text(runtime) + ")";
  }
  if (e != cudaSuccess) return "no CUDA device is usable: " + error;
  if (devices == 0) return "no CUDA device is usable: the driver reports none";
  return {};
}

/// The plugin probe: ok, or kUnavailable with the reason.
inline Status cuda_probe() {
  const std::string why = cuda_unusable_reason();
  if (why.empty()) return {};
  return {ErrorCode::kUnavailable, why};
}

}  // namespace switchyard::cuda_common

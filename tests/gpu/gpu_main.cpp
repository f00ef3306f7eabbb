// main() of the gpu-labelled tests: without a usable CUDA device it prints why and exits
// 77, which CTest reports as skipped (SKIP_RETURN_CODE), so that a CPU machine shows the
// reason instead of a silent pass; with one it runs the doctest cases.
#define DOCTEST_CONFIG_IMPLEMENT
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cstdio>

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device is usable here (%s)\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "the driver reports none");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}

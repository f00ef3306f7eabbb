/* Runs a Switchyard MoE layer from C: a runtime from a TOML file (or a small built-in
 * configuration), tokens handed over as a DLPack DLTensor without a copy, the result
 * checked against the dense reference, and the routing statistics printed.
 * usage: moe_forward [CONFIG.toml [section.key=value]...] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "switchyard/switchyard.h"

static int fail(const char* what, switchyard_status status) {
  fprintf(stderr, "moe_forward: %s: %s: %s\n", what, switchyard_status_name(status),
          switchyard_last_error());
  return 1;
}

static DLTensor matrix(float* data, int64_t* shape) {
  DLTensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.device.device_type = kDLCPU;
  t.ndim = 2;
  t.dtype.code = kDLFloat;
  t.dtype.bits = 32;
  t.dtype.lanes = 1;
  t.shape = shape; /* strides NULL: row-major */
  return t;
}

int main(int argc, char** argv) {
  const char* builtin =
      "[runtime]\nranks = 4\n[router]\ntop_k = 2\n[model]\nnum_experts = 8\nhidden = 64\n"
      "ffn_hidden = 128\n";
  switchyard_runtime* runtime = NULL;
  switchyard_status status;
  switchyard_stats stats;
  int64_t hidden = 0, shape[2];
  const int64_t tokens = 256;
  float *x, *y, *reference;
  DLTensor xt, yt, rt;
  double largest = 0, difference = 0;
  int64_t i;

  printf("switchyard %s (C API %d)\n", switchyard_version(), switchyard_api_version());
  status = argc > 1 ? switchyard_runtime_create_from_file(argv[1], (const char* const*)(argv + 2),
                                                          (size_t)(argc - 2), &runtime)
                    : switchyard_runtime_create_from_string(builtin, "builtin", NULL, 0, &runtime);
  if (status != SWITCHYARD_OK) return fail("creating the runtime", status);
  switchyard_runtime_hidden(runtime, &hidden);

  shape[0] = tokens;
  shape[1] = hidden;
  x = malloc(sizeof(float) * (size_t)(tokens * hidden));
  y = malloc(sizeof(float) * (size_t)(tokens * hidden));
  reference = malloc(sizeof(float) * (size_t)(tokens * hidden));
  if (x == NULL || y == NULL || reference == NULL) return 1;
  for (i = 0; i < tokens * hidden; ++i) x[i] = (float)sin(0.01 * (double)i);
  xt = matrix(x, shape);
  yt = matrix(y, shape);
  rt = matrix(reference, shape);

  status = switchyard_forward(runtime, &xt, &yt);
  if (status != SWITCHYARD_OK) return fail("forward", status);
  status = switchyard_reference_forward(runtime, &xt, &rt);
  if (status != SWITCHYARD_OK) return fail("reference", status);
  for (i = 0; i < tokens * hidden; ++i) {
    if (fabs(reference[i]) > largest) largest = fabs(reference[i]);
    if (fabs(y[i] - reference[i]) > difference) difference = fabs(y[i] - reference[i]);
  }
  status = switchyard_last_stats(runtime, &stats);
  if (status != SWITCHYARD_OK) return fail("statistics", status);
  printf("%lld tokens: imbalance %.3f, aux_loss %.4f, dispatch %.3f ms, combine %.3f ms\n",
         (long long)stats.tokens, stats.imbalance, stats.aux_loss, stats.dispatch_s * 1e3,
         stats.combine_s * 1e3);
  printf("max relative difference to the dense reference: %.3g\n",
         largest > 0 ? difference / largest : difference);
  switchyard_runtime_destroy(runtime);
  free(x);
  free(y);
  free(reference);
  return largest > 0 && difference <= 1e-5 * largest ? 0 : 1;
}

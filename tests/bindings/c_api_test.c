/* The C API from C99 (built with -std=c99 -Wall -Wextra -pedantic -Werror): a layer on two
 * in-process ranks against its dense reference, every error path's status and message,
 * and the plugin inventory. Exits non-zero on the first failed check. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "switchyard/switchyard.h"

static int failures = 0;

#define CHECK(condition)                                                                           \
  do {                                                                                             \
    if (!(condition)) {                                                                            \
      fprintf(stderr, "%s:%d: CHECK(%s) failed; last error: %s\n", __FILE__, __LINE__, #condition, \
              switchyard_last_error());                                                            \
      ++failures;                                                                                  \
    }                                                                                              \
  } while (0)

static DLTensor matrix(float* data, int64_t* shape) {
  DLTensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.device.device_type = kDLCPU;
  t.ndim = 2;
  t.dtype.code = kDLFloat;
  t.dtype.bits = 32;
  t.dtype.lanes = 1;
  t.shape = shape;
  return t;
}

int main(void) {
  const char* config =
      "[runtime]\nranks = 2\n[router]\ntop_k = 2\n[model]\nnum_experts = 4\nhidden = 8\n"
      "ffn_hidden = 16\n";
  const char* overrides[] = {"model.seed=7", "router.top_k=3"};
  switchyard_runtime* runtime = NULL;
  enum { T = 9, H = 8 };
  float x[T * H], y[T * H], reference[T * H];
  int64_t shape[2] = {T, H};
  DLTensor xt, yt, rt;
  int world = 0, experts = 0;
  int64_t hidden = 0;
  size_t plugins = 0, i = 0;
  int found_inproc = 0;
  double largest = 0, difference = 0;
  switchyard_stats stats;
  switchyard_plugin_info info;

  CHECK(switchyard_api_version() == SWITCHYARD_C_API_VERSION);
  CHECK(strlen(switchyard_version()) > 0);
  CHECK(switchyard_runtime_create_from_string(config, "c_api_test.toml", overrides, 2, &runtime) ==
        SWITCHYARD_OK);
  if (runtime == NULL) return 1;
  CHECK(switchyard_runtime_world_size(runtime, &world) == SWITCHYARD_OK && world == 2);
  CHECK(switchyard_runtime_hidden(runtime, &hidden) == SWITCHYARD_OK && hidden == H);
  CHECK(switchyard_runtime_num_experts(runtime, &experts) == SWITCHYARD_OK && experts == 4);

  for (i = 0; i < T * H; ++i) x[i] = (float)sin(0.37 * (double)i);
  xt = matrix(x, shape);
  yt = matrix(y, shape);
  rt = matrix(reference, shape);
  CHECK(switchyard_forward(runtime, &xt, &yt) == SWITCHYARD_OK);
  CHECK(switchyard_reference_forward(runtime, &xt, &rt) == SWITCHYARD_OK);
  for (i = 0; i < T * H; ++i) {
    if (fabs(reference[i]) > largest) largest = fabs(reference[i]);
    if (fabs(y[i] - reference[i]) > difference) difference = fabs(y[i] - reference[i]);
  }
  CHECK(largest > 0);
  CHECK(difference <= 1e-5 * largest);
  CHECK(switchyard_last_stats(runtime, &stats) == SWITCHYARD_OK);
  CHECK(stats.tokens == T);
  CHECK(stats.imbalance >= 1.0);

  /* Routing alone: top-3 of 4 experts per token, distinct and in range, weights positive,
   * descending (softmax scores order the slots) and summing to at most 1 (softmax over all
   * experts, the top 3 kept). */
  {
    int32_t chosen[T * 3];
    float weights[T * 3];
    int64_t route_shape[2] = {T, 3};
    DLTensor et = matrix((float*)chosen, route_shape), wt = matrix(weights, route_shape);
    int t, k, j;
    et.dtype.code = kDLInt;
    CHECK(switchyard_route(runtime, &xt, &et, &wt) == SWITCHYARD_OK);
    for (t = 0; t < T; ++t) {
      double sum = 0;
      for (k = 0; k < 3; ++k) {
        CHECK(chosen[t * 3 + k] >= 0 && chosen[t * 3 + k] < 4);
        CHECK(weights[t * 3 + k] > 0);
        sum += weights[t * 3 + k];
        for (j = 0; j < k; ++j) CHECK(chosen[t * 3 + j] != chosen[t * 3 + k]);
        if (k > 0) CHECK(weights[t * 3 + k - 1] >= weights[t * 3 + k]); /* by score */
      }
      CHECK(sum <= 1.0 + 1e-6);
    }
    route_shape[1] = 2;
    CHECK(switchyard_route(runtime, &xt, &et, &wt) == SWITCHYARD_INVALID_ARGUMENT);
    CHECK(strstr(switchyard_last_error(), "experts") != NULL);
  }

  /* Errors: a status, and a message on this thread. */
  shape[1] = H + 1;
  CHECK(switchyard_forward(runtime, &xt, &yt) == SWITCHYARD_INVALID_ARGUMENT);
  CHECK(strstr(switchyard_last_error(), "input x") != NULL);
  shape[1] = H;
  xt.dtype.bits = 64;
  CHECK(switchyard_forward(runtime, &xt, &yt) == SWITCHYARD_INVALID_ARGUMENT);
  xt.dtype.bits = 32;
  CHECK(switchyard_forward(runtime, NULL, &yt) == SWITCHYARD_INVALID_ARGUMENT);
  CHECK(strcmp(switchyard_status_name(SWITCHYARD_TIMEOUT), "timeout") == 0);
  {
    switchyard_runtime* bad = (switchyard_runtime*)1;
    const char* typo[] = {"router.topk=2"};
    CHECK(switchyard_runtime_create_from_string(config, "typo.toml", typo, 1, &bad) ==
          SWITCHYARD_INVALID_ARGUMENT);
    CHECK(bad == NULL);
    CHECK(strstr(switchyard_last_error(), "did you mean 'top_k'") != NULL);
    CHECK(switchyard_runtime_create_from_file("/nonexistent.toml", NULL, 0, &bad) ==
          SWITCHYARD_NOT_FOUND);
    CHECK(strstr(switchyard_last_error(), "/nonexistent.toml does not exist") != NULL);
    CHECK(switchyard_runtime_create_from_string("[runtime\n", NULL, NULL, 0, &bad) ==
          SWITCHYARD_INVALID_ARGUMENT);
    CHECK(strstr(switchyard_last_error(), "<string>:1:") != NULL);
  }

  /* The plugin inventory. */
  CHECK(switchyard_plugin_count(runtime, &plugins) == SWITCHYARD_OK);
  CHECK(plugins > 0);
  for (i = 0; i < plugins; ++i) {
    CHECK(switchyard_plugin_get(runtime, i, &info) == SWITCHYARD_OK);
    if (strcmp(info.kind, "transport") == 0 && strcmp(info.name, "inproc") == 0) {
      found_inproc = info.usable && info.reason[0] == '\0';
    }
  }
  CHECK(found_inproc);
  CHECK(switchyard_plugin_get(runtime, plugins, &info) == SWITCHYARD_INVALID_ARGUMENT);

  switchyard_runtime_destroy(runtime);
  switchyard_runtime_destroy(NULL);
  if (failures == 0) printf("c_api_test: all checks passed (max difference %.3g)\n", difference);
  return failures == 0 ? 0 : 1;
}

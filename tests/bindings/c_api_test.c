/* The C API from C99 (built with -std=c99 -Wall -Wextra -pedantic -Werror): a layer on two
 * in-process ranks against its dense reference, every error path's status and message,
 * the plugin inventory, and training (backward against central differences, parameter
 * views, a checkpoint). Exits non-zero if a check failed. */
#define _POSIX_C_SOURCE 200809L /* mkdtemp, rmdir */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

enum { TT = 9, TH = 8 }; /* the training check's tokens and hidden width */

/* L = sum of dy * y of the runtime's forward on x, in double. */
static double weighted_output(switchyard_runtime* runtime, float* x, const float* dy) {
  float y[TT * TH];
  int64_t shape[2] = {TT, TH};
  DLTensor xt = matrix(x, shape), yt = matrix(y, shape);
  double sum = 0;
  int i;
  CHECK(switchyard_forward(runtime, &xt, &yt) == SWITCHYARD_OK);
  for (i = 0; i < TT * TH; ++i) sum += (double)dy[i] * y[i];
  return sum;
}

/* The gradient of L at *value by a central difference (the value restored). */
static double difference_at(switchyard_runtime* runtime, float* x, const float* dy, float* value) {
  const float saved = *value, step = 1e-3f;
  double up, down;
  *value = saved + step;
  up = weighted_output(runtime, x, dy);
  *value = saved - step;
  down = weighted_output(runtime, x, dy);
  *value = saved;
  return (up - down) / (2.0 * (double)step);
}

/* Training through the C API: the backward's dx and gradients (gate, expert weights)
 * against central differences of the forward, taken through the parameter views; errors;
 * a checkpoint written and loaded back. */
static void check_training(void) {
  const char* config =
      "[runtime]\nranks = 2\n[router]\ntop_k = 2\n[model]\nnum_experts = 4\nhidden = 8\n"
      "ffn_hidden = 16\nseed = 5\n";
  const char* path = "c_api_test_trained.safetensors";
  switchyard_runtime* runtime = NULL;
  switchyard_runtime* again = NULL;
  float x[TT * TH], dy[TT * TH], dx[TT * TH], y[TT * TH], y_again[TT * TH];
  int64_t shape[2] = {TT, TH};
  DLTensor xt, dyt, dxt, yt, gate, gate_grad, down, down_grad, up, up_grad;
  double got[8], want[8], largest = 0, worst = 0;
  int i, n = 0;
  char weights[128];
  const char* load[] = {weights};

  CHECK(switchyard_runtime_create_from_string(config, "training.toml", NULL, 0, &runtime) ==
        SWITCHYARD_OK);
  if (runtime == NULL) return;
  for (i = 0; i < TT * TH; ++i) {
    x[i] = (float)sin(0.61 * (double)i + 0.3);
    dy[i] = (float)cos(0.43 * (double)i);
  }
  xt = matrix(x, shape);
  dyt = matrix(dy, shape);
  dxt = matrix(dx, shape);
  yt = matrix(y, shape);
  CHECK(switchyard_gradient(runtime, SWITCHYARD_TENSOR_GATE, 0, &gate_grad) ==
        SWITCHYARD_NOT_FOUND);
  CHECK(switchyard_set_training(runtime, 1) == SWITCHYARD_OK);
  CHECK(switchyard_forward(runtime, &xt, &yt) == SWITCHYARD_OK);
  CHECK(switchyard_backward(runtime, &xt, &dyt, &dxt) == SWITCHYARD_OK);
  CHECK(switchyard_parameter(runtime, SWITCHYARD_TENSOR_GATE, 0, &gate) == SWITCHYARD_OK);
  CHECK(switchyard_gradient(runtime, SWITCHYARD_TENSOR_GATE, 0, &gate_grad) == SWITCHYARD_OK);
  CHECK(switchyard_parameter(runtime, SWITCHYARD_TENSOR_EXPERT_DOWN, 1, &down) == SWITCHYARD_OK);
  CHECK(switchyard_gradient(runtime, SWITCHYARD_TENSOR_EXPERT_DOWN, 1, &down_grad) ==
        SWITCHYARD_OK);
  CHECK(switchyard_parameter(runtime, SWITCHYARD_TENSOR_EXPERT_UP, 3, &up) == SWITCHYARD_OK);
  CHECK(switchyard_gradient(runtime, SWITCHYARD_TENSOR_EXPERT_UP, 3, &up_grad) == SWITCHYARD_OK);
  CHECK(gate.ndim == 2 && gate.shape[0] == 4 && gate.shape[1] == TH);
  CHECK(down.ndim == 2 && down.shape[0] == TH && down.shape[1] == 16);
  CHECK(up_grad.ndim == 2 && up_grad.shape[0] == 16 && up_grad.shape[1] == TH);
  if (failures > 0) return;
  /* The gradients read now (the checks below run forwards, not backwards). */
  got[n] = dx[5];
  want[n++] = difference_at(runtime, x, dy, &x[5]);
  got[n] = dx[44];
  want[n++] = difference_at(runtime, x, dy, &x[44]);
  got[n] = ((float*)gate_grad.data)[3];
  want[n++] = difference_at(runtime, x, dy, &((float*)gate.data)[3]);
  got[n] = ((float*)gate_grad.data)[26];
  want[n++] = difference_at(runtime, x, dy, &((float*)gate.data)[26]);
  got[n] = ((float*)down_grad.data)[37];
  want[n++] = difference_at(runtime, x, dy, &((float*)down.data)[37]);
  got[n] = ((float*)up_grad.data)[11];
  want[n++] = difference_at(runtime, x, dy, &((float*)up.data)[11]);
  for (i = 0; i < n; ++i) {
    if (fabs(want[i]) > largest) largest = fabs(want[i]);
    if (fabs(got[i] - want[i]) > worst) worst = fabs(got[i] - want[i]);
  }
  CHECK(largest > 0);
  CHECK(worst <= 2e-3 * largest);

  /* Errors. */
  CHECK(switchyard_gradient(runtime, SWITCHYARD_TENSOR_EXPERT_GATE, 4, &gate_grad) ==
        SWITCHYARD_INVALID_ARGUMENT);
  CHECK(strstr(switchyard_last_error(), "expert 4 out of range") != NULL);
  CHECK(switchyard_parameter(runtime, 7, 0, &gate) == SWITCHYARD_INVALID_ARGUMENT);
  dy[3] = (float)NAN;
  CHECK(switchyard_backward(runtime, &xt, &dyt, &dxt) == SWITCHYARD_INVALID_ARGUMENT);
  CHECK(strstr(switchyard_last_error(), "is NaN") != NULL);
  dy[3] = 0.5f;

  /* A checkpoint of the weights as they are now, loaded back: the same forward. */
  ((float*)down.data)[0] += 0.125f;
  CHECK(switchyard_save_model(runtime, path) == SWITCHYARD_OK);
  CHECK(switchyard_forward(runtime, &xt, &yt) == SWITCHYARD_OK);
  sprintf(weights, "model.weights=%s", path);
  CHECK(switchyard_runtime_create_from_string(config, "training.toml", load, 1, &again) ==
        SWITCHYARD_OK);
  if (again != NULL) {
    yt = matrix(y_again, shape);
    CHECK(switchyard_forward(again, &xt, &yt) == SWITCHYARD_OK);
    CHECK(memcmp(y, y_again, sizeof y) == 0);
    switchyard_runtime_destroy(again);
  }
  remove(path);
  switchyard_runtime_destroy(runtime);
  printf("c_api_test: training gradients within %.3g of central differences (largest %.3g)\n",
         worst, largest);
}

/* A model of two MoE layers: the layer index of forward and stats. */
static void check_layers(void) {
  const char* config =
      "[runtime]\nranks = 2\n[model]\nnum_experts = 4\nhidden = 8\nffn_hidden = 16\n"
      "layers = \"0,3\"\n";
  switchyard_runtime* runtime = NULL;
  enum { T = 7, H = 8 };
  float x[T * H], a[T * H], b[T * H], c[T * H];
  int64_t shape[2] = {T, H};
  DLTensor xt, at, bt, ct;
  int layers = 0, i = 0, differ = 0;
  switchyard_stats stats;
  CHECK(switchyard_runtime_create_from_string(config, "layers.toml", NULL, 0, &runtime) ==
        SWITCHYARD_OK);
  if (runtime == NULL) return;
  CHECK(switchyard_runtime_num_layers(runtime, &layers) == SWITCHYARD_OK && layers == 2);
  for (i = 0; i < T * H; ++i) x[i] = (float)cos(0.21 * (double)i);
  xt = matrix(x, shape);
  at = matrix(a, shape);
  bt = matrix(b, shape);
  ct = matrix(c, shape);
  CHECK(switchyard_forward(runtime, &xt, &at) == SWITCHYARD_OK);
  CHECK(switchyard_forward_layer(runtime, 0, &xt, &bt) == SWITCHYARD_OK);
  CHECK(memcmp(a, b, sizeof a) == 0); /* switchyard_forward is layer 0 */
  CHECK(switchyard_forward_layer(runtime, 1, &xt, &ct) == SWITCHYARD_OK);
  for (i = 0; i < T * H; ++i) differ += a[i] != c[i];
  CHECK(differ > 0); /* layer 1 has weights of its own */
  CHECK(switchyard_layer_stats(runtime, 1, &stats) == SWITCHYARD_OK && stats.tokens == T);
  CHECK(switchyard_forward_layer(runtime, 2, &xt, &ct) == SWITCHYARD_INVALID_ARGUMENT);
  CHECK(strstr(switchyard_last_error(), "layer 2 does not exist") != NULL);
  CHECK(switchyard_layer_stats(runtime, -1, &stats) == SWITCHYARD_INVALID_ARGUMENT);
  switchyard_runtime_destroy(runtime);

  /* Replicated experts: 4 + 2 slots on 2 ranks, rebalanced for both layers' measured load;
   * the layers still compute the same function. */
  {
    const char* overrides[] = {"runtime.redundant_experts=2"};
    switchyard_rebalance_report reports[2];
    size_t count = 0;
    double largest = 0, difference = 0;
    CHECK(switchyard_runtime_create_from_string(config, "layers.toml", overrides, 1, &runtime) ==
          SWITCHYARD_OK);
    if (runtime == NULL) return;
    CHECK(switchyard_forward_layer(runtime, 1, &xt, &bt) == SWITCHYARD_OK);
    CHECK(switchyard_forward_layer(runtime, 0, &xt, &bt) == SWITCHYARD_OK);
    CHECK(switchyard_rebalance(runtime, reports, 2, &count) == SWITCHYARD_OK);
    CHECK(count == 2 && reports[0].layer == 0 && reports[1].layer == 1);
    CHECK(reports[0].slots == 6 && reports[0].imbalance_before >= 1.0);
    CHECK(switchyard_rebalance(runtime, NULL, 0, &count) == SWITCHYARD_OK && count == 2);
    CHECK(switchyard_rebalance(runtime, NULL, 1, &count) == SWITCHYARD_INVALID_ARGUMENT);
    CHECK(switchyard_forward_layer(runtime, 0, &xt, &bt) == SWITCHYARD_OK);
    for (i = 0; i < T * H; ++i) {
      largest = fmax(largest, fabs((double)a[i]));
      difference = fmax(difference, fabs((double)a[i] - (double)b[i]));
    }
    CHECK(difference <= 1e-5 * largest);
    switchyard_runtime_destroy(runtime);
  }
}

/* switchyard_forward_on_stream with a stream the caller made on the pretend device (the
 * fixture's own functions, found with dlsym): y is written once the caller waited for its
 * stream; the host data path has no streams. */
static void check_forward_on_stream(switchyard_runtime* host, switchyard_runtime* device,
                                    const DLTensor* xt, DLTensor* yt, float* y,
                                    const float* expected, size_t bytes) {
  void* library = dlopen(SWITCHYARD_FIXTURE_PLUGIN_DIR "/libswitchyard-datapath-pretend_cuda.so",
                         RTLD_NOW | RTLD_NOLOAD);
  void* (*create)(void) = NULL;
  void (*synchronize)(void*) = NULL;
  void (*destroy)(void*) = NULL;
  void* stream = NULL;
  CHECK(library != NULL);
  if (library == NULL) return;
  *(void**)&create = dlsym(library, "switchyard_fixture_stream_create");
  *(void**)&synchronize = dlsym(library, "switchyard_fixture_stream_synchronize");
  *(void**)&destroy = dlsym(library, "switchyard_fixture_stream_destroy");
  CHECK(create != NULL && synchronize != NULL && destroy != NULL);
  if (create == NULL || synchronize == NULL || destroy == NULL) return;
  stream = create();
  memset(y, 0xff, bytes); /* NaN */
  CHECK(switchyard_forward_on_stream(device, 0, xt, yt, stream) == SWITCHYARD_OK);
  synchronize(stream);
  CHECK(memcmp(y, expected, bytes) == 0);
  CHECK(switchyard_forward_on_stream(device, 1, xt, yt, stream) == SWITCHYARD_INVALID_ARGUMENT);
  CHECK(switchyard_forward_on_stream(host, 0, xt, yt, stream) == SWITCHYARD_INVALID_ARGUMENT);
  {
    DLTensor x_host = *xt, y_host = *yt;
    x_host.device.device_type = kDLCPU;
    y_host.device.device_type = kDLCPU;
    CHECK(switchyard_forward_on_stream(host, 0, &x_host, &y_host, stream) ==
          SWITCHYARD_UNAVAILABLE);
    CHECK(strstr(switchyard_last_error(), "no streams of a caller") != NULL);
  }
  destroy(stream);
  dlclose(library);
}

/* Tokens on a device: a pretend CUDA device (tests/fixtures/plugins, host memory that says
 * it is cuda:0) takes x and y as kDLCUDA tensors, as they are, and gives the bytes of the
 * host data path with the same experts; a tensor on another device is refused. */
static void check_device_tensors(void) {
  const char* config = "[runtime]\nranks = 2\nplugin_dirs = [\"" SWITCHYARD_FIXTURE_PLUGIN_DIR
                       "\"]\n[experts]\nkernel = \"pretend_swiglu\"\n[router]\ntop_k = 2\n[model]\n"
                       "num_experts = 4\nhidden = 8\nffn_hidden = 16\n";
  const char* on_device[] = {"runtime.data_path=pretend_cuda"};
  switchyard_runtime *host = NULL, *device = NULL;
  enum { T = 11, H = 8 };
  float x[T * H], expected[T * H], y[T * H];
  int64_t shape[2] = {T, H};
  DLTensor xt, yt, et;
  int i = 0;
  CHECK(switchyard_runtime_create_from_string(config, "host.toml", NULL, 0, &host) ==
        SWITCHYARD_OK);
  CHECK(switchyard_runtime_create_from_string(config, "device.toml", on_device, 1, &device) ==
        SWITCHYARD_OK);
  if (host == NULL || device == NULL) return;
  for (i = 0; i < T * H; ++i) {
    x[i] = (float)sin(0.53 * (double)i);
    y[i] = NAN;
  }
  xt = matrix(x, shape);
  et = matrix(expected, shape);
  CHECK(switchyard_forward(host, &xt, &et) == SWITCHYARD_OK);
  yt = matrix(y, shape);
  xt.device.device_type = kDLCUDA;
  yt.device.device_type = kDLCUDA;
  CHECK(switchyard_forward(device, &xt, &yt) == SWITCHYARD_OK);
  CHECK(memcmp(y, expected, sizeof y) == 0);
  /* Host tensors on the device runtime: staged, the same bytes. */
  xt.device.device_type = kDLCPU;
  yt.device.device_type = kDLCPU;
  memset(y, 0, sizeof y);
  CHECK(switchyard_forward(device, &xt, &yt) == SWITCHYARD_OK);
  CHECK(memcmp(y, expected, sizeof y) == 0);
  /* x on the device, y on the host; then both on another device. */
  xt.device.device_type = kDLCUDA;
  CHECK(switchyard_forward(device, &xt, &yt) == SWITCHYARD_INVALID_ARGUMENT);
  CHECK(strstr(switchyard_last_error(),
               "output: expected f32[11,8] contiguous device tensor (cuda:0)") != NULL);
  yt.device.device_type = kDLCUDA;
  xt.device.device_id = 1;
  yt.device.device_id = 1;
  CHECK(switchyard_forward(device, &xt, &yt) == SWITCHYARD_INVALID_ARGUMENT);
  CHECK(strstr(switchyard_last_error(),
               "input tokens: expected f32[*,8] contiguous host tensor, "
               "got f32[11,8] on cuda:1") != NULL);
  /* A device tensor on the host runtime. */
  CHECK(switchyard_forward(host, &xt, &yt) == SWITCHYARD_INVALID_ARGUMENT);
  /* On a stream of the caller's: queued behind its work and before its later work. */
  xt.device.device_id = 0;
  yt.device.device_id = 0;
  check_forward_on_stream(host, device, &xt, &yt, y, expected, sizeof y);
  switchyard_runtime_destroy(device);
  /* The worst-case mode: fixed blocks of 6 rows per peer (a rank gets 5 or 6 of the 11
   * tokens), the same bytes; its after-the-step checks find nothing. With 5, rank 0's 6
   * tokens are refused, and the next step works. */
  {
    const char* worst_case[] = {"runtime.data_path=pretend_cuda", "runtime.max_tokens_per_rank=6"};
    const char* too_few[] = {"runtime.data_path=pretend_cuda", "runtime.max_tokens_per_rank=5"};
    CHECK(switchyard_runtime_create_from_string(config, "device.toml", worst_case, 2, &device) ==
          SWITCHYARD_OK);
    memset(y, 0xff, sizeof y);
    CHECK(switchyard_forward(device, &xt, &yt) == SWITCHYARD_OK);
    CHECK(memcmp(y, expected, sizeof y) == 0);
    CHECK(switchyard_finish_worst_case_steps(device) == SWITCHYARD_OK);
    CHECK(switchyard_finish_worst_case_steps(NULL) == SWITCHYARD_INVALID_ARGUMENT);
    switchyard_runtime_destroy(device);
    CHECK(switchyard_runtime_create_from_string(config, "device.toml", too_few, 2, &device) ==
          SWITCHYARD_OK);
    CHECK(switchyard_forward(device, &xt, &yt) == SWITCHYARD_INVALID_ARGUMENT);
    CHECK(strstr(switchyard_last_error(),
                 "6 tokens on this rank, more than [runtime] max_tokens_per_rank = 5") != NULL);
    switchyard_runtime_destroy(device);
  }
  switchyard_runtime_destroy(host);
}

/* Hash routing (DeepSeek-V4): the tokens' ids go with them; an id outside the table is
 * refused by name. The table is written here as a .npy file: int32 [4, 2]. */
static void check_forward_with_ids(void) {
  static const char header[] = "{'descr': '<i4', 'fortran_order': False, 'shape': (4, 2), }";
  const int32_t table[8] = {0, 1, 2, 3, 1, 2, 3, 0};
  char dir[] = "/tmp/switchyard-c-api-XXXXXX";
  char path[256], config[512];
  unsigned char preamble[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0, 0};
  size_t padded = sizeof header; /* the header, spaces and '\n' up to a multiple of 64 */
  FILE* f = NULL;
  switchyard_runtime* runtime = NULL;
  enum { T = 6, H = 8 };
  float x[T * H], y[T * H];
  int64_t shape[2] = {T, H}, id_shape[1] = {T};
  int64_t ids[T] = {0, 3, 2, 1, 1, 0};
  DLTensor xt, yt, it;
  size_t i = 0;
  CHECK(mkdtemp(dir) != NULL);
  snprintf(path, sizeof path, "%s/tid2eid.npy", dir);
  while ((sizeof preamble + padded) % 64 != 0) ++padded;
  preamble[8] = (unsigned char)(padded & 0xff);
  preamble[9] = (unsigned char)(padded >> 8);
  f = fopen(path, "wb");
  CHECK(f != NULL);
  if (f == NULL) return;
  fwrite(preamble, 1, sizeof preamble, f);
  fwrite(header, 1, sizeof header - 1, f);
  for (i = sizeof header - 1; i + 1 < padded; ++i) fputc(' ', f);
  fputc('\n', f);
  fwrite(table, sizeof table[0], 8, f);
  fclose(f);
  snprintf(config, sizeof config,
           "[runtime]\nranks = 2\n[router]\npolicy = \"hash\"\ntable = \"%s\"\n[model]\n"
           "num_experts = 4\nhidden = 8\nffn_hidden = 16\n",
           path);
  CHECK(switchyard_runtime_create_from_string(config, "hash.toml", NULL, 0, &runtime) ==
        SWITCHYARD_OK);
  if (runtime == NULL) return;
  for (i = 0; i < T * H; ++i) x[i] = (float)cos(0.37 * (double)i);
  xt = matrix(x, shape);
  yt = matrix(y, shape);
  memset(&it, 0, sizeof it);
  it.data = ids;
  it.device.device_type = kDLCPU;
  it.ndim = 1;
  it.dtype.code = kDLInt;
  it.dtype.bits = 64;
  it.dtype.lanes = 1;
  it.shape = id_shape;
  CHECK(switchyard_forward_with_ids(runtime, 0, &xt, &it, &yt) == SWITCHYARD_OK);
  for (i = 0; i < T * H; ++i) CHECK(isfinite(y[i]));
  ids[4] = 4;
  CHECK(switchyard_forward_with_ids(runtime, 0, &xt, &it, &yt) == SWITCHYARD_INVALID_ARGUMENT);
  CHECK(strstr(switchyard_last_error(), "token 1 has id 4, outside the table's ids 0..3") !=
        NULL); /* rank 1's second token */
  CHECK(switchyard_forward(runtime, &xt, &yt) == SWITCHYARD_INVALID_ARGUMENT);
  CHECK(strstr(switchyard_last_error(), "no token ids were given") != NULL);
  CHECK(switchyard_forward_with_ids(runtime, 0, &xt, NULL, &yt) == SWITCHYARD_INVALID_ARGUMENT);
  switchyard_runtime_destroy(runtime);
  remove(path);
  rmdir(dir);
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

  /* Dispatch and combine with the test's own experts, f_e(v) = (e + 1) v: y[t] must be
   * sum_k w[t,k] (e_k + 1) x[t], summed here in double. The routing: a fixed plan with
   * an unused slot (-1) in every third token. */
  {
    int32_t plan_experts[T * 2];
    float plan_weights[T * 2];
    int64_t plan_shape[2] = {T, 2};
    DLTensor et = matrix((float*)plan_experts, plan_shape), wt = matrix(plan_weights, plan_shape);
    const DLTensor* outputs[2];
    switchyard_dispatch_handle* handle = NULL;
    switchyard_dispatch_part part;
    size_t parts = 0, p;
    int t, k, j;
    int64_t r, h, row_total;
    double worst = 0;
    et.dtype.code = kDLInt;
    for (t = 0; t < T; ++t) {
      plan_experts[t * 2] = t % 4;
      plan_experts[t * 2 + 1] = t % 3 == 2 ? -1 : (t + 1) % 4;
      plan_weights[t * 2] = 0.75f - 0.03f * (float)t;
      plan_weights[t * 2 + 1] = t % 3 == 2 ? 0.0f : 0.125f + 0.01f * (float)t;
    }
    CHECK(switchyard_dispatch_handle_create(runtime, &handle) == SWITCHYARD_OK);
    if (handle == NULL) return 1;
    CHECK(switchyard_dispatch(handle, &xt, &et, &wt) == SWITCHYARD_OK);
    CHECK(switchyard_dispatch_part_count(handle, &parts) == SWITCHYARD_OK && parts == 2);
    for (p = 0; p < parts; ++p) {
      CHECK(switchyard_dispatch_part_get(handle, p, &part) == SWITCHYARD_OK);
      CHECK(part.world_rank == (int)p && part.first_expert == 2 * (int)p);
      CHECK(part.num_local_experts == 2 && part.expert_input.ndim == 2);
      CHECK(part.expert_input.shape[1] == H && part.expert_output.shape[1] == H);
      row_total = 0;
      for (j = 0; j < part.num_local_experts; ++j) {
        const int e = part.first_expert + j;
        CHECK(part.expert_first_row[j] == row_total); /* no alignment: back to back */
        for (r = row_total; r < row_total + part.rows_per_expert[j]; ++r) {
          for (h = 0; h < H; ++h) {
            ((float*)part.expert_output.data)[r * H + h] =
                (float)(e + 1) * ((const float*)part.expert_input.data)[r * H + h];
          }
        }
        row_total += part.rows_per_expert[j];
      }
      CHECK(row_total == part.expert_input.shape[0]);
    }
    for (i = 0; i < T * H; ++i) y[i] = NAN;
    CHECK(switchyard_combine(handle, NULL, 0, &yt) == SWITCHYARD_OK);
    for (t = 0; t < T; ++t) {
      for (h = 0; h < H; ++h) {
        double expected = 0;
        for (k = 0; k < 2; ++k) {
          if (plan_experts[t * 2 + k] < 0) continue;
          expected +=
              (double)plan_weights[t * 2 + k] * (plan_experts[t * 2 + k] + 1) * x[t * H + h];
        }
        if (fabs(y[t * H + h] - expected) > worst) worst = fabs(y[t * H + h] - expected);
      }
    }
    CHECK(worst <= 1e-5);
    /* Once per dispatch; then the outputs given one per part. */
    CHECK(switchyard_combine(handle, NULL, 0, &yt) == SWITCHYARD_INVALID_ARGUMENT);
    CHECK(strstr(switchyard_last_error(), "combine needs a dispatch of its own") != NULL);
    CHECK(switchyard_dispatch(handle, &xt, &et, &wt) == SWITCHYARD_OK);
    { /* identity experts: the received rows themselves are the results, y = sum_k w x */
      switchyard_dispatch_part first, second;
      CHECK(switchyard_dispatch_part_get(handle, 0, &first) == SWITCHYARD_OK);
      CHECK(switchyard_dispatch_part_get(handle, 1, &second) == SWITCHYARD_OK);
      outputs[0] = &first.expert_input;
      outputs[1] = &second.expert_input;
      CHECK(switchyard_combine(handle, outputs, 1, &yt) == SWITCHYARD_INVALID_ARGUMENT);
      CHECK(strstr(switchyard_last_error(), "2 expected, 1 given") != NULL);
      CHECK(switchyard_combine(handle, outputs, 2, &yt) == SWITCHYARD_OK);
    }
    worst = 0;
    for (t = 0; t < T; ++t) {
      for (h = 0; h < H; ++h) {
        double expected = 0;
        for (k = 0; k < 2; ++k) {
          if (plan_experts[t * 2 + k] >= 0) expected += plan_weights[t * 2 + k] * x[t * H + h];
        }
        if (fabs(y[t * H + h] - expected) > worst) worst = fabs(y[t * H + h] - expected);
      }
    }
    CHECK(worst <= 1e-6);
    /* Refused input: a NaN token, an expert out of range; the part index past the end. */
    x[5 * H + 3] = NAN;
    CHECK(switchyard_dispatch(handle, &xt, &et, &wt) == SWITCHYARD_INVALID_ARGUMENT);
    CHECK(strstr(switchyard_last_error(), "token 0 feature 3 is NaN") != NULL); /* rank 1 */
    x[5 * H + 3] = 0.5f;
    plan_experts[2] = 4;
    CHECK(switchyard_dispatch(handle, &xt, &et, &wt) == SWITCHYARD_INVALID_ARGUMENT);
    CHECK(strstr(switchyard_last_error(), "has expert 4, outside 0..3") != NULL);
    CHECK(switchyard_dispatch_part_get(handle, 2, &part) == SWITCHYARD_INVALID_ARGUMENT);
    switchyard_dispatch_handle_destroy(handle);
    switchyard_dispatch_handle_destroy(NULL);
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
  check_layers();
  check_device_tensors();
  check_forward_with_ids();
  check_training();
  if (failures == 0) printf("c_api_test: all checks passed (max difference %.3g)\n", difference);
  return failures == 0 ? 0 : 1;
}

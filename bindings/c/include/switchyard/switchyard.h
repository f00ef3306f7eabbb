/* The Switchyard C API: the runtime and its MoE layer behind opaque handles, for C and for
 * languages that bind C (Rust, Go, ...). C99. Tensors are DLPack DLTensors (host memory,
 * row-major or strided float32 rows), read and written in place: nothing is copied at
 * the boundary.
 *
 * Errors: every function returns a switchyard_status; SWITCHYARD_OK is 0. The message of
 * the last error on the calling thread is switchyard_last_error(). No C++ exception
 * crosses this boundary.
 *
 * Threads: a runtime is used by one thread at a time; different runtimes are
 * independent. switchyard_last_error is per thread.
 *
 * Versions: SWITCHYARD_C_API_VERSION is the version of this header; switchyard_api_version()
 * is the one the library was built with. A program built with header version N runs with
 * a library whose api version is N (additions raise it; nothing is removed or changed
 * within a major Switchyard version). switchyard_version() is the library's version string.
 */
#ifndef SWITCHYARD_SWITCHYARD_H
#define SWITCHYARD_SWITCHYARD_H

#include <dlpack/dlpack.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 2: training (switchyard_backward and the rest); 3: replicated experts
 * (switchyard_rebalance, switchyard_dispatch_part's local_experts). */
#define SWITCHYARD_C_API_VERSION 3

/* Visibility of the entry points (set by the library's build; empty for its users). */
#ifndef SWITCHYARD_C_EXPORT
#define SWITCHYARD_C_EXPORT
#endif

/* The same codes as the C++ ErrorCode (switchyard/status.hpp). */
typedef enum switchyard_status {
  SWITCHYARD_OK = 0,
  SWITCHYARD_INVALID_ARGUMENT = 1, /* bad config, shape, dtype, NaN input: fix the input */
  SWITCHYARD_NOT_FOUND = 2,        /* a plugin, a file, a tensor in a checkpoint */
  SWITCHYARD_UNAVAILABLE = 3,      /* exists but cannot work here (launcher, device) */
  SWITCHYARD_ABI_MISMATCH = 4,     /* a plugin built for another core */
  SWITCHYARD_TIMEOUT = 5,          /* a peer did not answer within [runtime] timeout_s */
  SWITCHYARD_SYSTEM = 6,           /* the operating system refused (memory, I/O) */
  SWITCHYARD_PEER_FAILED = 7,      /* another rank failed first and reports why */
  SWITCHYARD_INTERNAL = 8          /* a bug: please report it */
} switchyard_status;

/* A runtime: configuration, plugins, model, transports and the layers of the ranks this
 * process hosts. */
typedef struct switchyard_runtime switchyard_runtime;

/* Statistics of the last forward, over all ranks. */
typedef struct switchyard_stats {
  int64_t tokens;   /* tokens routed */
  int64_t dropped;  /* (token, expert) assignments dropped by capacity */
  double imbalance; /* max / mean tokens per expert */
  double aux_loss;  /* Switch load-balancing loss (1 = perfect balance) */
  double z_loss;    /* mean logsumexp(logits)^2 */
  /* The slowest rank's seconds per phase. */
  double route_s, layout_s, dispatch_s, experts_s, combine_s;
  /* Bytes all ranks sent to other ranks. */
  uint64_t dispatch_bytes, combine_bytes;
} switchyard_stats;

/* One plugin found by the loader. The strings live as long as the runtime. */
typedef struct switchyard_plugin_info {
  const char* kind; /* "transport", "router", "expert" or "datapath" */
  const char* name;
  const char* version;
  const char* path;
  int usable;         /* 1 when its probe passed here */
  const char* reason; /* why it cannot work here; "" when usable */
} switchyard_plugin_info;

/* The library's version, e.g. "0.1.0". Never fails. */
SWITCHYARD_C_EXPORT const char* switchyard_version(void);
/* SWITCHYARD_C_API_VERSION as the library was built. Never fails. */
SWITCHYARD_C_EXPORT int switchyard_api_version(void);
/* The message of the last error on this thread ("" before any). Valid until this thread's
 * next call into the library. */
SWITCHYARD_C_EXPORT const char* switchyard_last_error(void);
/* A short name of a status, e.g. "timeout". Never fails. */
SWITCHYARD_C_EXPORT const char* switchyard_status_name(switchyard_status status);

/* Creates a runtime from a TOML file, then applies `overrides` ("section.key=value", as
 * `--set` on the command line; may be NULL when n_overrides is 0). Collective when the
 * transport is (every rank of a job calls it). On error *out is NULL. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_runtime_create_from_file(
    const char* path, const char* const* overrides, size_t n_overrides, switchyard_runtime** out);
/* The same from TOML text; `source_name` names it in messages (NULL: "<string>"). */
SWITCHYARD_C_EXPORT switchyard_status switchyard_runtime_create_from_string(
    const char* toml, const char* source_name, const char* const* overrides, size_t n_overrides,
    switchyard_runtime** out);
/* Frees the runtime. NULL is allowed. */
SWITCHYARD_C_EXPORT void switchyard_runtime_destroy(switchyard_runtime* runtime);

/* Sizes: ranks in the job, hidden width H, experts E. */
SWITCHYARD_C_EXPORT switchyard_status
switchyard_runtime_world_size(const switchyard_runtime* runtime, int* out);
SWITCHYARD_C_EXPORT switchyard_status switchyard_runtime_hidden(const switchyard_runtime* runtime,
                                                                int64_t* out);
SWITCHYARD_C_EXPORT switchyard_status
switchyard_runtime_num_experts(const switchyard_runtime* runtime, int* out);
/* L, the model's MoE layers ([model] layers; 1 by default). Functions without a layer
 * argument act on layer 0; the _layer forms take its index 0..L-1. */
SWITCHYARD_C_EXPORT switchyard_status
switchyard_runtime_num_layers(const switchyard_runtime* runtime, int* out);

/* The MoE layer on this process's tokens x [T,H] float32, writing y [T,H] float32 (y may
 * not alias x). x and y are both host memory (kDLCPU), or both on the device of the
 * runtime's data path ([runtime] data_path, e.g. kDLCUDA), which the layers take as they
 * are. Returns when y is written. Each rank this process hosts takes its block of the T
 * rows: with one rank per process (mpirun, switchyard launch) x is that rank's own tokens.
 * Collective. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_forward(switchyard_runtime* runtime,
                                                         const DLTensor* x, DLTensor* y);
/* switchyard_forward through MoE layer `layer` (index 0..L-1); an index out of range is
 * SWITCHYARD_INVALID_ARGUMENT naming the layers there are. Collective. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_forward_layer(switchyard_runtime* runtime,
                                                               int layer, const DLTensor* x,
                                                               DLTensor* y);
/* switchyard_forward_layer with the tokens' ids `token_ids` [T] int32 or int64 (host), for
 * a layer whose router routes by them ([router] policy = "hash": DeepSeek-V4's hash
 * layers); an id outside the router's table is SWITCHYARD_INVALID_ARGUMENT naming the token.
 * Collective. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_forward_with_ids(switchyard_runtime* runtime,
                                                                  int layer, const DLTensor* x,
                                                                  const DLTensor* token_ids,
                                                                  DLTensor* y);
/* switchyard_forward_layer ordered on the caller's stream of the data path's device:
 * `stream` is its native handle (a cudaStream_t for CUDA; 0, the legacy default stream,
 * too). x and y on that device. The layer's work starts after the work queued on `stream`
 * before the call (x written), and work the caller queues on `stream` afterwards runs after
 * y is written. Returns without waiting for y: the host waits only for the per-peer counts.
 * A host data path has no streams: SWITCHYARD_UNAVAILABLE. Collective. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_forward_on_stream(switchyard_runtime* runtime,
                                                                   int layer, const DLTensor* x,
                                                                   DLTensor* y, void* stream);
/* With [runtime] max_tokens_per_rank (the worst-case mode, whose forwards report what
 * needs the host after the step): waits for the reports of every layer of this process's
 * ranks and returns the first failure they hold (NaN logits of a device routing, a bad
 * expert id in a device plan, a peer that refused its input), else SWITCHYARD_OK. Local,
 * not collective; nothing to do outside the mode. */
SWITCHYARD_C_EXPORT switchyard_status
switchyard_finish_worst_case_steps(switchyard_runtime* runtime);
/* What switchyard_rebalance did to one layer (see Runtime::rebalance). */
typedef struct switchyard_rebalance_report {
  int layer;
  int slots;                /* expert slots of an EP group */
  double imbalance_before;  /* max/mean of the EP ranks' measured load since the last one */
  double imbalance_planned; /* the same load under the new placement */
  int64_t moved_experts;    /* expert copies sent to a new rank, per EP group */
  uint64_t received_bytes;  /* weight bytes this process's ranks received */
} switchyard_rebalance_report;

/* Collective over the world: places every layer's experts anew for the load measured since
 * the runtime was made or the last rebalance, moves the weights of the slots that change
 * rank over the EP group, and switches every layer together once all have moved. Writes
 * up to `capacity` reports (one per layer) to `reports` (may be NULL when capacity is 0)
 * and their count to `*count`. A failure (a rank lost, a timeout) returns its error on
 * every rank and leaves the previous placement in force. Host data path; not in training
 * mode. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_rebalance(switchyard_runtime* runtime,
                                                           switchyard_rebalance_report* reports,
                                                           size_t capacity, size_t* count);
/* The dense single-process reference of the same computation (float64 inside). */
SWITCHYARD_C_EXPORT switchyard_status
switchyard_reference_forward(const switchyard_runtime* runtime, const DLTensor* x, DLTensor* y);
/* The routing of tokens x [T,H] float32 by the runtime's router (logits from the gate, then
 * the configured policy), as this process's first rank routes: local, not collective
 * (router statistics are not updated). Writes `experts` [T,K] int32 (-1 for a dropped or
 * unused slot; rows by descending selection score, ties to the lower expert) and `weights`
 * [T,K] float32 (0 where the expert is -1). K is the policy's slots per token (top_k for
 * token choice); other shapes are refused naming the expected one. Host data path only. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_route(switchyard_runtime* runtime,
                                                       const DLTensor* x, DLTensor* experts,
                                                       DLTensor* weights);
/* Dispatch and combine, for experts the caller computes (its own kernels, another
 * framework's). A handle belongs to one runtime and is reused across steps: its buffers
 * only grow. One thread at a time. */
typedef struct switchyard_dispatch_handle switchyard_dispatch_handle;

/* What one rank this process hosts received in the last dispatch. The tensors point into
 * the handle's memory: valid until the handle's next dispatch or its destruction. */
typedef struct switchyard_dispatch_part {
  int world_rank;
  int first_expert;      /* its first expert slot: with one slot per expert (no
                            [runtime] placement or redundant_experts), the global id of
                            its first local expert */
  int num_local_experts; /* its slots: first_expert .. first_expert + this - 1 */
  int64_t first_token;   /* its first row of the dispatched x */
  int64_t num_tokens;    /* its rows of x */
  /* [num_local_experts]: received rows per local expert, grouped in that order. */
  const int64_t* rows_per_expert;
  DLTensor expert_input;  /* [A,H] float32: the rows to compute, expert j's from row
                             expert_first_row[j] */
  DLTensor expert_output; /* [A,H] float32: a buffer for the results (may be passed back) */
  /* [num_local_experts]: each expert's first row in expert_input: the running sum of
   * rows_per_expert, each block padded to [runtime] expert_alignment with zero rows. */
  const int64_t* expert_first_row;
  /* [num_local_experts]: the global id of the expert each local slot holds (a shuffled or
   * replicated placement: several slots may hold copies of one expert, with its weights). */
  const int* local_experts;
} switchyard_dispatch_part;

SWITCHYARD_C_EXPORT switchyard_status
switchyard_dispatch_handle_create(switchyard_runtime* runtime, switchyard_dispatch_handle** out);
/* Frees the handle. NULL is allowed. Destroy handles before their runtime. */
SWITCHYARD_C_EXPORT void switchyard_dispatch_handle_destroy(switchyard_dispatch_handle* handle);
/* Sends this process's tokens x [T,H] float32 to the ranks of their experts: `experts`
 * [T,K] int32 (-1: unused slot) and `weights` [T,K] float32 (any strides) are the routing,
 * e.g. from switchyard_route. The local ranks split x as in switchyard_forward. Bad input
 * (shapes, expert ids outside 0..E-1, non-finite weights, NaN or infinite tokens) is
 * refused on every rank together, before any row moves. Host data path. Collective. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_dispatch(switchyard_dispatch_handle* handle,
                                                          const DLTensor* x,
                                                          const DLTensor* experts,
                                                          const DLTensor* weights);
/* The parts of the last dispatch: one per rank this process hosts. */
SWITCHYARD_C_EXPORT switchyard_status
switchyard_dispatch_part_count(const switchyard_dispatch_handle* handle, size_t* out);
SWITCHYARD_C_EXPORT switchyard_status switchyard_dispatch_part_get(
    switchyard_dispatch_handle* handle, size_t index, switchyard_dispatch_part* out);
/* Weighs the experts' results, sends them back and sums them per token into y [T,H]
 * float32 (T of the dispatch). `expert_outputs` holds one [A,H] float32 tensor per part,
 * in the order of its expert_input; NULL with n_outputs 0 takes each part's own
 * expert_output. Once per dispatch. Arguments are checked before anything is sent.
 * Collective. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_combine(switchyard_dispatch_handle* handle,
                                                         const DLTensor* const* expert_outputs,
                                                         size_t n_outputs, DLTensor* y);

/* Training. */

/* A tensor of the model: the router's gate [E,H] (`expert` ignored), or one expert's gate
 * [F,H], up [F,H] or down [H,F] projection. Passed as an int (`which`): any other value is
 * refused with SWITCHYARD_INVALID_ARGUMENT. */
typedef enum switchyard_tensor {
  SWITCHYARD_TENSOR_GATE = 0,
  SWITCHYARD_TENSOR_EXPERT_GATE = 1,
  SWITCHYARD_TENSOR_EXPERT_UP = 2,
  SWITCHYARD_TENSOR_EXPERT_DOWN = 3
} switchyard_tensor;

/* Training mode (1) or not (0, the default): in training mode forwards keep what the
 * backward needs (the received rows and the experts' projections), unless
 * [runtime] recompute = true. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_set_training(switchyard_runtime* runtime,
                                                              int training);
/* The backward of the last switchyard_forward, given the same x [T,H] and dy = dL/dy
 * [T,H] float32: writes dx [T,H] float32 and keeps the parameters' gradients in the runtime
 * (switchyard_gradient) until the next backward: the gate's summed over the world, each
 * expert's over its DP group. A NaN or infinite dy is refused on every rank together.
 * Collective. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_backward(switchyard_runtime* runtime,
                                                          const DLTensor* x, const DLTensor* dy,
                                                          DLTensor* dx);
/* A float32 host view of the last backward's gradient of `which` (of `expert`), valid until
 * the next backward or switchyard_runtime_destroy. SWITCHYARD_NOT_FOUND for an expert this
 * process holds no rank of, or before any backward. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_gradient(switchyard_runtime* runtime, int which,
                                                          int expert, DLTensor* out);
/* A writable float32 host view of the weights of `which` (of `expert`), for an optimizer
 * to update in place between steps (the layers read these tensors); valid while the
 * runtime lives. The ranks of one process share them: update each once per process.
 * SWITCHYARD_NOT_FOUND for an expert this process holds no rank of; SWITCHYARD_INVALID_
 * ARGUMENT when the experts are not float32. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_parameter(switchyard_runtime* runtime, int which,
                                                           int expert, DLTensor* out);
/* Writes the model as a safetensors checkpoint at `path` from world rank 0, in [model]
 * format and prefix (f32). Collective. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_save_model(switchyard_runtime* runtime,
                                                            const char* path);

/* Statistics and timings of the last forward. Collective. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_last_stats(switchyard_runtime* runtime,
                                                            switchyard_stats* out);
/* The same for MoE layer `layer`'s last forward. Collective. */
SWITCHYARD_C_EXPORT switchyard_status switchyard_layer_stats(switchyard_runtime* runtime, int layer,
                                                             switchyard_stats* out);

/* The plugins the runtime's loader finds (all of them are loaded to be listed). */
SWITCHYARD_C_EXPORT switchyard_status switchyard_plugin_count(switchyard_runtime* runtime,
                                                              size_t* out);
SWITCHYARD_C_EXPORT switchyard_status switchyard_plugin_get(const switchyard_runtime* runtime,
                                                            size_t index,
                                                            switchyard_plugin_info* out);

#ifdef __cplusplus
}
#endif

#endif /* SWITCHYARD_SWITCHYARD_H */

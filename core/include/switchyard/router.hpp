#pragma once
/// \file
/// The routing interface: which experts each token goes to, with which weights.
/// Semantics of every policy are in docs/routing.md.

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/buffer.hpp"
#include "switchyard/stream.hpp"
#include "switchyard/tensor.hpp"
#include "switchyard/topology.hpp"

namespace switchyard {

/// A routing decision for T tokens with K slots each. Owned by the caller and reused
/// across calls: `route` resizes the buffers, which allocates only when they grow. The
/// buffers live where their allocator puts them (host by default; a device plan for a
/// router that takes device logits).
struct RoutingPlan {
  RoutingPlan() = default;
  /// A plan whose buffers come from `allocator`.
  explicit RoutingPlan(Allocator& allocator)
      : experts(allocator), weights(allocator), counts(allocator) {}
  std::int64_t num_tokens = 0;  ///< T
  int slots = 0;                ///< K
  /// [T,K] row-major; -1 where a slot is dropped or unused. Rows ordered by descending
  /// selection score (ties: lower expert index) for token-choice policies.
  Buffer<std::int32_t> experts;
  /// [T,K]; 0 where the expert is -1.
  Buffer<float> weights;
  /// [E]; kept assignments per expert.
  Buffer<std::int64_t> counts;
  Device device() const noexcept { return experts.device(); }
};

/// Statistics of the last `route` call, over this rank's tokens.
struct RouterStats {
  std::vector<std::int64_t> counts;  ///< [E] kept assignments per expert
  std::int64_t dropped = 0;          ///< assignments removed (capacity)
  double imbalance = 0;              ///< max(counts) / mean(counts); 0 when no tokens
  double aux_loss = 0;               ///< Switch load-balancing loss, 1 = perfect balance
  double z_loss = 0;                 ///< mean over tokens of logsumexp(z)^2
  // The sums the losses are made of, so that a group's losses come from group-wide sums
  // (docs/routing.md): aux_loss = E / (k·T²) · Σ_e probability_sums[e] · aux_counts[e].
  int top_k = 0;                         ///< the k of the aux loss's plain top-k
  std::int64_t tokens = 0;               ///< T
  std::vector<double> probability_sums;  ///< [E] Σ_t P[t,e]
  std::vector<std::int64_t> aux_counts;  ///< [E] tokens whose plain top-k of P holds e
  double z_loss_sum = 0;                 ///< Σ_t logsumexp(z_t)²
};

/// Completes `stats` from what a policy filled in (counts, dropped, tokens and the sums):
/// imbalance, aux_loss and z_loss exactly as docs/routing.md defines them. Written once for
/// every policy and for the sums over an EP group.
void finish_router_stats(RouterStats& stats) noexcept;

/// What a router sees besides the logits.
struct RouteInput {
  TensorView logits;                   ///< f32 [T,E], contiguous, on the stream's device
  const Topology* topology = nullptr;  ///< placement of the EP group's ranks; may be null
  /// i32 or i64 [T] host: the tokens' ids (vocabulary indices), for policies that route by
  /// them (`Router::needs_token_ids`: hash routing); empty otherwise.
  TensorView token_ids = {};
};

/// What `Router::backward` needs: the forward's logits and plan, and the gradient of the
/// loss with respect to the plan's weights.
struct RouteGradientInput {
  TensorView logits;                   ///< f32 [T,E] host contiguous: the forward's
  const Topology* topology = nullptr;  ///< the forward's
  const RoutingPlan* plan = nullptr;   ///< the forward's plan of these logits (host)
  TensorView d_weights;  ///< f32 [T,K] host contiguous: dL/d plan.weights (empty slots ignored)
  /// The scope of the aux and z losses: the EP group's tokens and its plain top-k counts
  /// [E] (`RouterStats::tokens` and `aux_counts` summed over the group), as the group's
  /// losses are defined. 0 and empty: this rank's own, from the last `route`.
  std::int64_t loss_tokens = 0;
  std::span<const std::int64_t> loss_aux_counts;
};

/// The scope of the losses a router's backward differentiates.
struct RouterLossScope {
  std::int64_t tokens = 0;
  std::span<const std::int64_t> aux_counts;  ///< [E]
};

/// `in`'s loss_tokens and loss_aux_counts, or where those are 0 and empty, `stats` (the
/// router's own, of its last route). The span views `in`'s or `stats`' counts. Throws
/// Error(kInvalidArgument) "router POLICY backward: N aux counts for E experts" unless there
/// are `num_experts` of them.
RouterLossScope router_loss_scope(const RouteGradientInput& in, const RouterStats& stats,
                                  int num_experts, std::string_view policy);
/// The forward's plan a `Router::backward` needs: `in.plan`, in host memory, for T tokens
/// (`in.logits`' rows) of `slots` slots. Throws Error(kInvalidArgument) "router POLICY
/// backward: needs the forward's plan in host memory for T tokens x K slots" otherwise.
const RoutingPlan& require_backward_plan(const RouteGradientInput& in, int slots,
                                         std::string_view policy);

/// A token-choice policy as data (docs/routing.md), so that a device data path can compute
/// what the host policy computes, bit for bit, on logits in device memory.
struct TokenChoiceSpec {
  /// For messages, e.g. "topk": a view of the router's own name (taking the spec every step
  /// copies nothing).
  std::string_view policy;
  int top_k = 1;                ///< k
  bool sigmoid = false;         ///< scores: sigmoid, else softmax
  bool pre_softmax = true;      ///< softmax over all experts, else over the k selected logits
  bool normalize = false;       ///< weights divided by (their sum + 1e-20)
  float scale = 1.0f;           ///< multiplies the weights
  std::span<const float> bias;  ///< [E] host, added for selection only; empty: none
  /// Group limiting: groups of consecutive experts, group g = experts
  /// [group_begin[g], group_begin[g+1]); empty: none.
  std::span<const int> group_begin;
  int max_groups = 0;  ///< M groups kept per token
  int group_take = 1;  ///< a group's score: the sum of its `group_take` largest values
};

/// A routing policy. One instance per rank; not thread-safe (one thread routes at a time).
class Router {
 public:
  virtual ~Router() = default;
  /// Policy name, e.g. "topk".
  virtual std::string name() const = 0;
  /// Number of experts E the router was configured for.
  virtual int num_experts() const noexcept = 0;
  /// K: slots per token in the plans this router produces.
  virtual int slots_per_token() const noexcept = 0;
  /// Memory kinds and stream behaviour (see stream.hpp).
  virtual ExecutionCapabilities capabilities() const noexcept { return {}; }
  /// Routes `input.logits` [T,E] into `plan` (on the same device) on `stream` and updates
  /// `stats()`. A host-synchronous router (the default) has finished when it returns; the
  /// core synchronizes the stream before it calls one. Bad input (wrong shape, NaN or Inf
  /// logits under the default nan_policy) throws `Error(kInvalidArgument)` naming the first
  /// bad token and expert, and leaves `plan` unspecified but valid to reuse. Allocates
  /// only when T grows.
  virtual void route(const RouteInput& input, RoutingPlan& plan, Stream& stream) = 0;
  /// Statistics of the last successful `route` (host memory; after the stream is
  /// synchronized for a stream-ordered router).
  virtual const RouterStats& stats() const noexcept = 0;
  /// The selection bias [E] (empty when the policy has none).
  virtual std::span<const float> bias() const noexcept = 0;
  /// Stateful policies (bias balancing) update from the kept counts [E] summed over the
  /// EP group. Stateless policies ignore it.
  virtual void update(std::span<const std::int64_t> global_counts) = 0;
  /// True when `route` needs `RouteInput::token_ids` (hash routing): the layer's callers
  /// then pass the tokens' ids with them.
  virtual bool needs_token_ids() const noexcept { return false; }
  /// True when `update` changes the policy (bias balancing is on): the runtime then sums
  /// the kept counts over the EP group after every step and calls it.
  virtual bool updates_from_counts() const noexcept { return false; }
  /// The policy as a `TokenChoiceSpec` for the placement `topology`, when a device data path
  /// can compute it instead (token-choice selection without a capacity limit or masking);
  /// nothing otherwise. Valid until the next call on this router.
  virtual std::optional<TokenChoiceSpec> token_choice_spec(const Topology* /*topology*/) {
    return std::nullopt;
  }
  /// Writes d_logits [T,E] (f32 host contiguous): the gradient of the loss with respect to
  /// the logits through the weights the plan kept (the routing decisions are the forward's,
  /// recomputed from the same logits, so a dropped slot still shares its token's
  /// normalisation but passes no gradient of its own; the selection bias gets none), plus
  /// `[router] aux_loss_coeff` · d aux_loss + `z_loss_coeff` · d z_loss over the scope
  /// `input` gives. Host-synchronous. Throws `Error(kUnavailable)` for a policy without a
  /// gradient (the default), `Error(kInvalidArgument)` for shapes that do not match.
  virtual void backward(const RouteGradientInput& input, const TensorView& d_logits);
  /// Takes `computed` (counts, tokens and the loss sums of a route that a device data path
  /// computed from `token_choice_spec`) as the statistics of the last route. Throws
  /// `Error(kUnavailable)` for policies without a spec.
  virtual void adopt_stats(const RouterStats& computed);
};

}  // namespace switchyard

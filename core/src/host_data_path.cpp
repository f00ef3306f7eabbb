// The host implementation of the data-path primitives, and the payload conversions.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "row_kernels.hpp"
#include "switchyard/data_path.hpp"
#include "switchyard/placement.hpp"
#include "switchyard/router_logits.hpp"
#include "switchyard/status.hpp"

namespace switchyard {
namespace {

std::size_t to_size(std::int64_t v) { return static_cast<std::size_t>(v); }

std::size_t fp8_scales(std::int64_t hidden) {
  return to_size((hidden + kFp8BlockSize - 1) / kFp8BlockSize);
}

constexpr float kFp8Max = 448.0f;

/// Bytes of the encoded elements of a row, before the padding.
std::size_t encoded_bytes(PayloadDType dtype, std::int64_t hidden) noexcept {
  switch (dtype) {
    case PayloadDType::kF32:
      return to_size(hidden) * 4;
    case PayloadDType::kBF16:
      return to_size(hidden) * 2;
    case PayloadDType::kFP8:
      return fp8_scales(hidden) * 4 + to_size(hidden);
  }
  return 0;
}

void encode_row(const float* in, std::int64_t hidden, PayloadDType dtype, std::byte* out,
                bool streaming) {
  switch (dtype) {
    case PayloadDType::kF32:
      detail::row_kernels().copy(in, hidden, reinterpret_cast<float*>(out), streaming);
      return;
    case PayloadDType::kBF16:
      detail::row_kernels().encode_bf16(in, hidden, reinterpret_cast<std::uint16_t*>(out),
                                        streaming);
      return;
    case PayloadDType::kFP8: {
      auto* scales = reinterpret_cast<float*>(out);
      auto* codes = reinterpret_cast<std::uint8_t*>(out + fp8_scales(hidden) * sizeof(float));
      for (std::int64_t first = 0, b = 0; first < hidden; first += kFp8BlockSize, ++b) {
        const std::int64_t last = std::min(hidden, first + kFp8BlockSize);
        float amax = 0.0f;
        for (std::int64_t h = first; h < last; ++h) amax = std::max(amax, std::fabs(in[h]));
        const float scale = amax > 0.0f ? amax / kFp8Max : 1.0f;
        scales[b] = scale;
        const float inverse = 1.0f / scale;
        for (std::int64_t h = first; h < last; ++h) codes[h] = float_to_fp8_e4m3(in[h] * inverse);
      }
      return;
    }
  }
}

}  // namespace

void require_expert_row_dtype(DType dtype, std::string_view what) {
  if (dtype != DType::kF32 && dtype != DType::kBF16) {
    throw Error(ErrorCode::kInvalidArgument,
                std::string(what) + " in " + std::string(dtype_name(dtype)) + "; f32 or bf16 only");
  }
}

void detail::decode_payload_row(const std::byte* in, std::int64_t hidden, PayloadDType dtype,
                                float* out, bool streaming) {
  switch (dtype) {
    case PayloadDType::kF32:
      detail::row_kernels().copy(reinterpret_cast<const float*>(in), hidden, out, streaming);
      return;
    case PayloadDType::kBF16:
      detail::row_kernels().decode_bf16(reinterpret_cast<const std::uint16_t*>(in), hidden, out,
                                        streaming);
      return;
    case PayloadDType::kFP8: {
      const auto* scales = reinterpret_cast<const float*>(in);
      const auto* codes =
          reinterpret_cast<const std::uint8_t*>(in + fp8_scales(hidden) * sizeof(float));
      for (std::int64_t h = 0; h < hidden; ++h) {
        out[h] = fp8_e4m3_to_float(codes[h]) * scales[h / kFp8BlockSize];
      }
      return;
    }
  }
}

namespace {

using detail::kStreamingBytes;

void prefetch_row(const float* row, std::int64_t hidden) {
  detail::prefetch(row, to_size(hidden) * sizeof(float));
}

class HostDataPath final : public DataPath {
 public:
  Device device() const noexcept override { return Device::host(); }
  Allocator& allocator() noexcept override { return host_allocator(); }
  Allocator& staging_allocator() noexcept override { return host_allocator(); }
  std::unique_ptr<Stream> create_stream(bool queued) override {
    return std::make_unique<HostStream>(queued ? HostStream::Mode::kQueued
                                               : HostStream::Mode::kInline);
  }

  void router_logits(const TensorView& x, const TensorView& gate, const TensorView& logits,
                     Stream& /*stream*/) override {
    compute_router_logits(x, gate, logits.data_as<float>());
  }

  void layout_counts(const LayoutCountsArgs& a, Stream& /*stream*/) override {
    const int R = a.placement->num_ranks();
    std::fill(a.rows_to, a.rows_to + R, 0);
    if (a.slots_to_expert != nullptr) {
      std::fill(a.slots_to_expert, a.slots_to_expert + a.placement->num_experts(), 0);
    }
    for (std::int64_t t = 0; t < a.num_tokens; ++t) {
      const std::int32_t* ex = a.experts + t * a.slots;
      for (int j = 0; j < a.slots; ++j) {
        if (ex[j] < 0) continue;
        const int d = a.placement->rank_of(ex[j]);
        if (!earlier_slot_same_rank(ex, j, d, *a.placement)) ++a.rows_to[d];
        if (a.slots_to_expert != nullptr) ++a.slots_to_expert[ex[j]];
      }
    }
  }

  void layout(const LayoutArgs& a, Stream& /*stream*/) override {
    const int R = a.placement->num_ranks();
    const int K = a.slots;
    const int E = a.placement->num_experts();
    const bool blocks = a.block_rows > 0;
    if (blocks) {
      cursor_.resize(to_size(R));
      for (int p = 0; p < R; ++p) cursor_[to_size(p)] = p * a.block_rows;
      *a.first_bad_slot = -1;
    } else {
      cursor_.assign(a.rows_to_offset.begin(), a.rows_to_offset.end());
    }
    current_row_.resize(to_size(R));
    for (std::int64_t t = 0; t < a.num_tokens; ++t) {
      const std::int32_t* ex = a.experts + t * K;
      const float* w = a.weights + t * K;
      if (blocks) {
        // Nobody checked a device plan's ids: a token with a bad one sends nothing.
        const std::int32_t* bad =
            std::find_if(ex, ex + K, [E](std::int32_t e) { return e < -1 || e >= E; });
        if (bad != ex + K) {
          if (*a.first_bad_slot < 0) *a.first_bad_slot = t * K + (bad - ex);
          continue;
        }
      }
      for (int j = 0; j < K; ++j) {
        if (ex[j] < 0) continue;
        const int d = a.placement->rank_of(ex[j]);
        if (!earlier_slot_same_rank(ex, j, d, *a.placement)) {
          const std::int64_t row = cursor_[to_size(d)]++;
          current_row_[to_size(d)] = row;
          a.send_row_token[row] = t;
          SlotMeta* slots = a.send_meta + row * K;
          for (int k = 0; k < K; ++k) slots[k] = {-1, 0.0f};
        }
        SlotMeta* slots = a.send_meta + current_row_[to_size(d)] * K;
        int k = 0;
        while (slots[k].local_expert >= 0) ++k;
        slots[k] = {ex[j] - a.placement->first_expert(d), w[j]};
      }
    }
    if (!blocks) return;
    for (int p = 0; p < R; ++p) {
      for (std::int64_t row = cursor_[to_size(p)]; row < (p + 1) * a.block_rows; ++row) {
        a.send_row_token[row] = -1;
        std::fill_n(a.send_meta + row * K, K, SlotMeta{-1, 0.0f});
      }
    }
  }

  void pack(const PackArgs& a, Stream& /*stream*/) override {
    const std::size_t row_bytes = payload_row_bytes(a.dtype, a.hidden);
    const std::size_t data_bytes = encoded_bytes(a.dtype, a.hidden);
    const bool streaming = to_size(a.num_rows) * row_bytes >= kStreamingBytes;
    for (std::int64_t s = 0; s < a.num_rows; ++s) {
      std::byte* row = a.rows + to_size(s) * row_bytes;
      const std::int64_t t = a.send_row_token[s];
      if (t < 0) {  // padding
        std::memset(row, 0, row_bytes);
        continue;
      }
      if (s + 1 < a.num_rows && a.send_row_token[s + 1] >= 0)
        prefetch_row(a.x + a.send_row_token[s + 1] * a.hidden, a.hidden);
      encode_row(a.x + t * a.hidden, a.hidden, a.dtype, row, streaming);
      std::memset(row + data_bytes, 0, row_bytes - data_bytes);
    }
    if (streaming) detail::row_kernels().fence();
  }

  void pack_runs(const PackArgs& a, std::span<const PackRun> runs, Stream& /*stream*/) override {
    // Token-major: each step takes the smallest token at the head of any run and encodes
    // its row once per run that holds it, so x is read once, the repeats from the cache.
    const std::size_t row_bytes = payload_row_bytes(a.dtype, a.hidden);
    const std::size_t data_bytes = encoded_bytes(a.dtype, a.hidden);
    std::int64_t total = 0;
    for (const PackRun& run : runs) total += run.num_rows;
    const bool streaming = to_size(total) * row_bytes >= kStreamingBytes;
    cursor_.assign(runs.size(), 0);
    // A run's padding rows (token -1) come after its tokens: they end its merge.
    auto head_token = [&](std::size_t r) {
      const std::int64_t t =
          cursor_[r] < runs[r].num_rows ? a.send_row_token[runs[r].first_row + cursor_[r]] : -1;
      return t >= 0 ? t : std::numeric_limits<std::int64_t>::max();
    };
    auto smallest_head = [&] {
      std::int64_t t = std::numeric_limits<std::int64_t>::max();
      for (std::size_t r = 0; r < runs.size(); ++r) t = std::min(t, head_token(r));
      return t;
    };
    for (std::int64_t t = smallest_head(); t != std::numeric_limits<std::int64_t>::max();) {
      const float* x = a.x + t * a.hidden;
      for (std::size_t r = 0; r < runs.size(); ++r) {
        if (head_token(r) != t) continue;
        std::byte* row = runs[r].rows + to_size(cursor_[r]++) * row_bytes;
        encode_row(x, a.hidden, a.dtype, row, streaming);
        std::memset(row + data_bytes, 0, row_bytes - data_bytes);
      }
      t = smallest_head();
      if (t != std::numeric_limits<std::int64_t>::max()) prefetch_row(a.x + t * a.hidden, a.hidden);
    }
    for (std::size_t r = 0; r < runs.size(); ++r) {
      const std::int64_t padding = runs[r].num_rows - cursor_[r];
      if (padding > 0)
        std::memset(runs[r].rows + to_size(cursor_[r]) * row_bytes, 0,
                    to_size(padding) * row_bytes);
    }
    if (streaming) detail::row_kernels().fence();
  }

  void count_groups(const GroupCountArgs& a, Stream& /*stream*/) override {
    std::fill(a.rows_per_expert, a.rows_per_expert + a.num_local_experts, 0);
    for (std::int64_t i = 0; i < a.num_rows * a.slots; ++i) {
      const std::int32_t l = a.meta[i].local_expert;
      if (l < 0) continue;
      if (l >= a.num_local_experts) {
        throw Error(ErrorCode::kInternal, "MoE dispatch: received a row for local expert " +
                                              std::to_string(l) + " but this rank holds " +
                                              std::to_string(a.num_local_experts));
      }
      ++a.rows_per_expert[l];
    }
  }

  void group_by_expert(const GroupArgs& a, Stream& /*stream*/) override {
    const std::size_t row_bytes = payload_row_bytes(a.dtype, a.hidden);
    cursor_.resize(to_size(a.num_local_experts));
    group_end_.resize(to_size(a.num_local_experts));
    std::int64_t first = 0;
    for (int l = 0; l < a.num_local_experts; ++l) {
      cursor_[to_size(l)] = first;
      first += a.rows_per_expert[l];
      group_end_[to_size(l)] = first;
    }
    require_expert_row_dtype(a.expert_input_dtype, "group_by_expert: expert rows");
    const bool to_bf16 = a.expert_input_dtype == DType::kBF16;
    const std::size_t out_row_bytes = to_size(a.hidden) * dtype_size(a.expert_input_dtype);
    const bool streaming = to_size(first) * out_row_bytes >= kStreamingBytes;
    // bf16 rows from an f32 or fp8 payload: decoded once per row, then rounded per slot.
    if (to_bf16 && a.dtype != PayloadDType::kBF16) decoded_.resize(to_size(a.hidden));
    const detail::RowKernels& kernels = detail::row_kernels();
    for (std::int64_t r = 0; r < a.num_rows; ++r) {
      const std::byte* row = a.rows + to_size(r) * row_bytes;
      if (r + 1 < a.num_rows) detail::prefetch(row + row_bytes, row_bytes);
      bool decoded = false;
      for (int j = 0; j < a.slots; ++j) {
        const std::int32_t l = a.meta[r * a.slots + j].local_expert;
        std::int64_t& assignment = a.assignment_of_slot[r * a.slots + j];
        if (l < 0) {
          assignment = -1;
          continue;
        }
        if (l >= a.num_local_experts || cursor_[to_size(l)] == group_end_[to_size(l)]) {
          // A row for an expert this rank lacks, or more than its count: the sender's
          // counts and slots disagree (never from the layer's own exchange).
          throw Error(ErrorCode::kInternal,
                      "MoE dispatch: received a row for local expert " + std::to_string(l) +
                          (l >= a.num_local_experts
                               ? " but this rank holds " + std::to_string(a.num_local_experts)
                               : " beyond the " + std::to_string(a.rows_per_expert[l]) +
                                     " rows its count announced"));
        }
        assignment = cursor_[to_size(l)]++;
        std::byte* out = a.expert_input + to_size(assignment) * out_row_bytes;
        if (!to_bf16) {
          detail::decode_payload_row(row, a.hidden, a.dtype, reinterpret_cast<float*>(out),
                                     streaming);
        } else if (a.dtype == PayloadDType::kBF16) {
          std::memcpy(out, row, out_row_bytes);
        } else {
          if (!decoded) {
            detail::decode_payload_row(row, a.hidden, a.dtype, decoded_.data(), false);
            decoded = true;
          }
          kernels.encode_bf16(decoded_.data(), a.hidden, reinterpret_cast<std::uint16_t*>(out),
                              streaming);
        }
      }
    }
    if (a.rows_in_block != nullptr) {
      std::int64_t start = 0;
      for (int l = 0; l < a.num_local_experts; ++l) {
        a.rows_in_block[l] = cursor_[to_size(l)] - start;
        start = group_end_[to_size(l)];
      }
    }
    if (streaming) kernels.fence();
  }

  void scale_grouped_rows(const SlotRowsArgs& a, const float* rows, float* scaled,
                          Stream& /*stream*/) override {
    const std::int64_t NK = a.num_rows * a.slots;
    for (std::int64_t i = 0; i < NK; ++i) {
      const std::int64_t g = a.assignment_of_slot[i];
      if (g < 0) continue;
      const float w = a.meta[i].weight;
      const float* in = rows + g * a.hidden;
      float* out = scaled + g * a.hidden;
      for (std::int64_t h = 0; h < a.hidden; ++h) out[h] = w * in[h];
    }
  }

  void slot_dot_products(const SlotRowsArgs& a, const float* rows, const float* outputs,
                         float* dots, Stream& /*stream*/) override {
    const std::int64_t NK = a.num_rows * a.slots;
    for (std::int64_t i = 0; i < NK; ++i) {
      const std::int64_t g = a.assignment_of_slot[i];
      float dot = 0;
      if (g >= 0) {
        const float* r = rows + g * a.hidden;
        const float* o = outputs + g * a.hidden;
        for (std::int64_t h = 0; h < a.hidden; ++h) dot += r[h] * o[h];
      }
      dots[i] = dot;
    }
  }

  void weighted_reduce(const WeightedReduceArgs& a, Stream& /*stream*/) override {
    const std::int64_t H = a.hidden;
    require_expert_row_dtype(a.expert_output_dtype, "weighted_reduce: expert outputs");
    const detail::RowKernels& kernels = detail::row_kernels();
    if (rows_.size() < to_size(a.slots)) rows_.resize(to_size(a.slots));
    weights_.resize(to_size(a.slots));
    // bf16 expert rows: each widened into a row of its slot, then summed as f32 rows.
    const bool widen = a.expert_output_dtype == DType::kBF16;
    if (widen) widened_.resize(to_size(a.slots) * to_size(H));
    const std::size_t in_row_bytes = to_size(H) * dtype_size(a.expert_output_dtype);
    auto expert_row = [&](std::int64_t at) { return a.expert_output + to_size(at) * in_row_bytes; };
    const std::size_t row_bytes = to_size(H) * dtype_size(a.combine_dtype);
    const bool streaming = to_size(a.num_rows) * row_bytes >= kStreamingBytes;
    for (std::int64_t r = 0; r < a.num_rows; ++r) {
      if (r + 1 < a.num_rows) {
        for (int j = 0; j < a.slots; ++j) {
          const std::int64_t next = a.assignment_of_slot[(r + 1) * a.slots + j];
          if (next >= 0) detail::prefetch(expert_row(next), in_row_bytes);
        }
      }
      int count = 0;
      for (int j = 0; j < a.slots; ++j) {
        const std::int64_t at = a.assignment_of_slot[r * a.slots + j];
        if (at < 0) continue;
        if (widen) {
          float* row = widened_.data() + to_size(count) * to_size(H);
          kernels.decode_bf16(reinterpret_cast<const std::uint16_t*>(expert_row(at)), H, row,
                              false);
          rows_[to_size(count)] = row;
        } else {
          rows_[to_size(count)] = reinterpret_cast<const float*>(expert_row(at));
        }
        weights_[to_size(count)] = a.meta[r * a.slots + j].weight;
        ++count;
      }
      std::byte* partial = a.partial_rows + to_size(r) * row_bytes;
      if (a.combine_dtype == DType::kF32) {
        kernels.weighted_sum(rows_.data(), weights_.data(), count, H,
                             reinterpret_cast<float*>(partial), streaming);
      } else {
        kernels.weighted_sum_bf16(rows_.data(), weights_.data(), count, H,
                                  reinterpret_cast<std::uint16_t*>(partial), streaming);
      }
    }
    if (streaming) kernels.fence();
  }

  void unpermute_sum(const UnpermuteSumArgs& a, Stream& /*stream*/) override {
    const std::int64_t H = a.hidden;
    const detail::RowKernels& kernels = detail::row_kernels();
    // Each token's rows as a list in row order: first row of each token, then the next.
    first_row_.assign(to_size(a.num_tokens), -1);
    next_row_.resize(to_size(a.num_rows));
    for (std::int64_t s = a.num_rows - 1; s >= 0; --s) {
      const std::int64_t t = a.send_row_token[s];
      if (t < 0) continue;  // padding
      next_row_[to_size(s)] = first_row_[to_size(t)];
      first_row_[to_size(t)] = s;
    }
    const std::size_t row_bytes = to_size(H) * dtype_size(a.combine_dtype);
    const bool f32 = a.combine_dtype == DType::kF32;
    const bool streaming = to_size(a.num_tokens * H) * sizeof(float) >= kStreamingBytes;
    for (std::int64_t t = 0; t < a.num_tokens; ++t) {
      if (t + 1 < a.num_tokens) {
        for (std::int64_t s = first_row_[to_size(t + 1)]; s >= 0; s = next_row_[to_size(s)]) {
          detail::prefetch(a.combined_rows + to_size(s) * row_bytes, row_bytes);
        }
      }
      int count = 0;
      for (std::int64_t s = first_row_[to_size(t)]; s >= 0; s = next_row_[to_size(s)], ++count) {
        const std::byte* row = a.combined_rows + to_size(s) * row_bytes;
        if (f32) {
          if (to_size(count) == rows_.size()) rows_.push_back(nullptr);
          rows_[to_size(count)] = reinterpret_cast<const float*>(row);
        } else {
          if (to_size(count) == bf16_rows_.size()) bf16_rows_.push_back(nullptr);
          bf16_rows_[to_size(count)] = reinterpret_cast<const std::uint16_t*>(row);
        }
      }
      float* y = a.y + t * H;
      if (f32) {
        kernels.sum(rows_.data(), count, H, y, streaming);
      } else {
        kernels.sum_bf16(bf16_rows_.data(), count, H, y, streaming);
      }
    }
    if (streaming) kernels.fence();
  }

  void copy(void* dst, const void* src, std::size_t bytes, Stream& /*stream*/) override {
    if (bytes != 0) std::memmove(dst, src, bytes);
  }

 private:
  /// Whether a slot before `j` of this token already goes to rank `d`.
  static bool earlier_slot_same_rank(const std::int32_t* ex, int j, int d,
                                     const ExpertPlacement& placement) {
    for (int i = 0; i < j; ++i) {
      if (ex[i] >= 0 && placement.rank_of(ex[i]) == d) return true;
    }
    return false;
  }

  // Scratch, reused: per-rank or per-expert cursors; the rows (f32 or bf16) and weights of
  // one sum; each token's first row and each row's next row of the same token.
  std::vector<std::int64_t> cursor_, group_end_, current_row_;
  std::vector<float> decoded_;  // one received row in f32, for bf16 expert rows
  std::vector<float> widened_;  // a row's bf16 expert outputs in f32, one row per slot
  std::vector<const float*> rows_;
  std::vector<float> weights_;
  std::vector<std::int64_t> first_row_, next_row_;
  std::vector<const std::uint16_t*> bf16_rows_;
};

}  // namespace

std::string_view payload_dtype_name(PayloadDType dtype) noexcept {
  switch (dtype) {
    case PayloadDType::kF32:
      return "f32";
    case PayloadDType::kBF16:
      return "bf16";
    case PayloadDType::kFP8:
      return "fp8";
  }
  return "?";
}

PayloadDType parse_payload_dtype(std::string_view name) {
  for (auto d : {PayloadDType::kF32, PayloadDType::kBF16, PayloadDType::kFP8}) {
    if (payload_dtype_name(d) == name) return d;
  }
  throw Error(ErrorCode::kInvalidArgument,
              "payload dtype \"" + std::string(name) + "\": expected f32, bf16 or fp8");
}

std::size_t payload_row_bytes(PayloadDType dtype, std::int64_t hidden) noexcept {
  return (encoded_bytes(dtype, hidden) + 3) / 4 * 4;
}

void DataPath::scale_grouped_rows(const SlotRowsArgs& /*args*/, const float* /*rows*/,
                                  float* /*scaled*/, Stream& /*stream*/) {
  throw Error(ErrorCode::kUnavailable,
              "this data path has no backward primitives (scale_grouped_rows) yet");
}

void DataPath::slot_dot_products(const SlotRowsArgs& /*args*/, const float* /*rows*/,
                                 const float* /*outputs*/, float* /*dots*/, Stream& /*stream*/) {
  throw Error(ErrorCode::kUnavailable,
              "this data path has no backward primitives (slot_dot_products) yet");
}

std::unique_ptr<Stream> DataPath::borrow_stream(void* /*native_handle*/) {
  throw Error(ErrorCode::kUnavailable,
              "the " + device_name(device()) +
                  " data path has no streams of a caller to order after: its calls are done "
                  "when they return");
}

void DataPath::finish_route_token_choice(RouterStats& /*stats*/) {
  throw Error(ErrorCode::kInternal,
              "finish_route_token_choice called on a data path that does not route");
}

std::unique_ptr<DataPath> make_host_data_path() { return std::make_unique<HostDataPath>(); }

}  // namespace switchyard

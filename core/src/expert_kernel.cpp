// The checks every expert kernel makes on its batch, the fused form's default, and the
// identity experts (expert_kernel.hpp).
#include "switchyard/expert_kernel.hpp"

#include <algorithm>
#include <cstring>

#include "row_kernels.hpp"
#include "switchyard/status.hpp"

namespace switchyard {

void require_expert_weight(const TensorView& weight, const TensorView& block_scales,
                           std::string_view what, std::int64_t rows, std::int64_t cols) {
  const DType d = weight.dtype();
  if (d != DType::kF32 && d != DType::kBF16 && d != DType::kF16 && d != DType::kF8E4M3) {
    throw Error(ErrorCode::kInvalidArgument,
                std::string(what) + " is " + std::string(dtype_name(d)) +
                    "; f32, bf16, f16 and block-scaled f8_e4m3 weights are supported");
  }
  weight.require(what, d, {rows, cols});
  if (d != DType::kF8E4M3 && block_scales.data() != nullptr) {
    throw Error(ErrorCode::kInvalidArgument, std::string(what) + " has block scales but is " +
                                                 std::string(dtype_name(d)) +
                                                 " (scales belong to f8_e4m3 weights)");
  }
  if (d != DType::kF8E4M3) return;
  const std::int64_t br = weight_scale_blocks(rows), bc = weight_scale_blocks(cols);
  // Checked here first, so that the message's name is built only when it fails.
  const auto shape = block_scales.shape();
  if (block_scales.data() == nullptr || block_scales.dtype() != DType::kF32 || shape.size() != 2 ||
      shape[0] != br || shape[1] != bc) {
    block_scales.require(std::string(what) + " block scales", DType::kF32, {br, bc});
    throw Error(ErrorCode::kInvalidArgument, std::string(what) + ": its block scales are missing");
  }
}

void widen_expert_weight(const TensorView& weight, const TensorView& block_scales, float* dst) {
  const std::int64_t rows = weight.dim(0), cols = weight.dim(1);
  require_expert_weight(weight, block_scales, "expert weight", rows, cols);
  if (weight.dtype() != DType::kF8E4M3) {
    widen_to_f32(weight.data(), weight.dtype(), static_cast<std::size_t>(weight.numel()), dst);
    return;
  }
  const std::int64_t block_cols = weight_scale_blocks(cols);
  const auto* codes = weight.data_as<const std::uint8_t>();
  const float* scales = block_scales.data_as<const float>();
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row_scales = scales + (r / kWeightScaleBlock) * block_cols;
    for (std::int64_t c = 0; c < cols; ++c) {
      dst[r * cols + c] =
          fp8_e4m3_to_float(codes[r * cols + c]) * row_scales[c / kWeightScaleBlock];
    }
  }
}

std::int64_t check_expert_batch(const ExpertBatch& batch, std::int64_t hidden,
                                std::size_t num_experts, Device device,
                                const ExpertBatchNames& names, DType input_dtype,
                                DType output_dtype) {
  const std::string& kernel = names.kernel;
  batch.input.require_on(device, names.input,
                         batch.input.dtype() == input_dtype ? input_dtype : DType::kF32,
                         {-1, hidden});
  const std::int64_t N = batch.input.dim(0);
  batch.output.require_on(device, names.output,
                          batch.output.dtype() == output_dtype ? output_dtype : DType::kF32,
                          {N, hidden});
  if (batch.rows_per_expert.size() != num_experts) {
    throw Error(ErrorCode::kInvalidArgument,
                kernel + ": " + std::to_string(batch.rows_per_expert.size()) + " row counts for " +
                    std::to_string(num_experts) + " local experts");
  }
  std::int64_t total = 0, largest = 0;
  for (const std::int64_t n : batch.rows_per_expert) {
    if (n < 0) throw Error(ErrorCode::kInvalidArgument, kernel + ": negative row count");
    total += n;
    largest = std::max(largest, n);
  }
  if (total != N) {
    throw Error(ErrorCode::kInvalidArgument, kernel + ": row counts sum to " +
                                                 std::to_string(total) + ", batch has " +
                                                 std::to_string(N) + " rows");
  }
  return largest;
}

std::int64_t check_expert_gradient_batch(const ExpertGradientBatch& batch, std::int64_t hidden,
                                         std::int64_t ffn_hidden, std::size_t num_experts,
                                         Device device, const ExpertBatchNames& names) {
  batch.input.require_on(device, names.input, DType::kF32, {-1, hidden});
  const std::int64_t N = batch.input.dim(0);
  batch.d_output.require_on(device, names.d_output, DType::kF32, {N, hidden});
  batch.d_input.require_on(device, names.d_input, DType::kF32, {N, hidden});
  if (batch.row_weights.data() != nullptr) {
    batch.row_weights.require_on(device, names.row_weights, DType::kF32, {N});
  }
  if (batch.d_row_weights.data() != nullptr) {
    batch.d_row_weights.require_on(device, names.d_row_weights, DType::kF32, {N});
  }
  if (batch.saved.data() != nullptr) {
    batch.saved.require_on(device, names.saved, DType::kF32, {N, 2 * ffn_hidden});
  }
  // The row counts as the forward's (d_input has the output's shape).
  const std::int64_t largest =
      check_expert_batch(ExpertBatch{batch.input, batch.rows_per_expert, batch.d_input}, hidden,
                         num_experts, device, names);
  if (ffn_hidden == 0) {
    if (!batch.d_weights.empty()) {
      throw Error(ErrorCode::kInvalidArgument, names.kernel + ": has no weights to give gradients");
    }
    return largest;
  }
  if (batch.d_weights.size() != num_experts) {
    throw Error(ErrorCode::kInvalidArgument,
                names.kernel + ": " + std::to_string(batch.d_weights.size()) +
                    " weight gradients for " + std::to_string(num_experts) + " local experts");
  }
  for (const SwigluExpertGradients& g : batch.d_weights) {
    g.gate.require_on(device, names.d_weight, DType::kF32, {ffn_hidden, hidden});
    g.up.require_on(device, names.d_weight, DType::kF32, {ffn_hidden, hidden});
    g.down.require_on(device, names.d_weight, DType::kF32, {hidden, ffn_hidden});
  }
  return largest;
}

ExpertGradientStorage::ExpertGradientStorage(int num_experts, std::int64_t hidden,
                                             std::int64_t ffn_hidden) {
  for (int e = 0; e < num_experts; ++e) {
    tensors_.emplace_back(DType::kF32, std::vector<std::int64_t>{ffn_hidden, hidden});
    tensors_.emplace_back(DType::kF32, std::vector<std::int64_t>{ffn_hidden, hidden});
    tensors_.emplace_back(DType::kF32, std::vector<std::int64_t>{hidden, ffn_hidden});
  }
  for (std::size_t e = 0; e < static_cast<std::size_t>(num_experts); ++e) {
    views_.push_back(
        {tensors_[3 * e].view(), tensors_[3 * e + 1].view(), tensors_[3 * e + 2].view()});
  }
}

void ExpertGradientStorage::zero() noexcept {
  for (HostTensor& t : tensors_) std::fill_n(t.data<float>(), t.numel(), 0.0f);
}

void ExpertKernel::backward(const ExpertGradientBatch& /*batch*/, Stream& /*stream*/) {
  throw Error(ErrorCode::kUnavailable, "expert kernel \"" + name() + "\" has no backward pass");
}

void ExpertKernel::forward_weighted(const WeightedRowsBatch& /*batch*/, Stream& /*stream*/) {
  throw Error(ErrorCode::kUnavailable,
              "expert kernel \"" + name() + "\" does not form weighted rows (fused path)");
}

IdentityExperts::IdentityExperts(int num_local_experts) : num_local_experts_(num_local_experts) {
  if (num_local_experts < 0) {
    throw Error(ErrorCode::kInvalidArgument, "identity experts: negative expert count");
  }
}

void IdentityExperts::forward(const ExpertBatch& batch, Stream& /*stream*/) {
  const std::int64_t hidden = batch.input.rank() == 2 ? batch.input.dim(1) : -1;
  check_expert_batch(batch, hidden, static_cast<std::size_t>(num_local_experts_), Device::host(),
                     names_);
  if (batch.input.numel() > 0 && batch.input.data() != batch.output.data()) {
    std::memcpy(batch.output.data(), batch.input.data(),
                static_cast<std::size_t>(batch.input.numel()) * sizeof(float));
  }
}

void IdentityExperts::backward(const ExpertGradientBatch& batch, Stream& /*stream*/) {
  const std::int64_t hidden = batch.input.rank() == 2 ? batch.input.dim(1) : -1;
  check_expert_gradient_batch(batch, hidden, 0, static_cast<std::size_t>(num_local_experts_),
                              Device::host(), names_);
  // output = input: d_input = w · d_output, d w = <d_output, input>.
  const std::int64_t N = batch.input.dim(0);
  const float* g = batch.d_output.data_as<const float>();
  const float* x = batch.input.data_as<const float>();
  const float* w = batch.row_weights.data_as<const float>();
  float* dx = batch.d_input.data_as<float>();
  float* dw = batch.d_row_weights.data_as<float>();
  for (std::int64_t r = 0; r < N; ++r) {
    const float weight = w != nullptr ? w[r] : 1.0f;
    float dot = 0;
    for (std::int64_t h = 0; h < hidden; ++h) {
      dot += g[r * hidden + h] * x[r * hidden + h];
      dx[r * hidden + h] = weight * g[r * hidden + h];
    }
    if (dw != nullptr) dw[r] = dot;
  }
}

void IdentityExperts::forward_weighted(const WeightedRowsBatch& batch, Stream& /*stream*/) {
  if (batch.partial_dtype != DType::kF32 && batch.partial_dtype != DType::kBF16) {
    throw Error(ErrorCode::kInvalidArgument, "identity experts: partial sums must be f32 or bf16");
  }
  const std::int64_t H = batch.hidden;
  const auto K = static_cast<std::size_t>(batch.slots);
  const detail::RowKernels& kernels = detail::row_kernels();
  row_.resize(static_cast<std::size_t>(H));
  inputs_.assign(K, row_.data());
  weights_.resize(K);
  const std::size_t in_bytes = payload_row_bytes(batch.dtype, H);
  const std::size_t out_bytes = static_cast<std::size_t>(H) * dtype_size(batch.partial_dtype);
  const bool streaming =
      static_cast<std::size_t>(batch.num_rows) * out_bytes >= detail::kStreamingBytes;
  for (std::int64_t r = 0; r < batch.num_rows; ++r) {
    const SlotMeta* slots = batch.meta + static_cast<std::size_t>(r) * K;
    int count = 0;
    for (std::size_t j = 0; j < K; ++j) {
      const std::int32_t l = slots[j].local_expert;
      if (l < 0) continue;
      if (l >= num_local_experts_) {
        throw Error(ErrorCode::kInvalidArgument, "identity experts: row " + std::to_string(r) +
                                                     " names local expert " + std::to_string(l) +
                                                     " of " + std::to_string(num_local_experts_));
      }
      weights_[static_cast<std::size_t>(count++)] = slots[j].weight;
    }
    if (r + 1 < batch.num_rows) {
      detail::prefetch(batch.rows + static_cast<std::size_t>(r + 1) * in_bytes, in_bytes);
    }
    // expert_e(row) is the row itself: decode it once, then weigh it once per slot.
    if (count > 0) {
      detail::decode_payload_row(batch.rows + static_cast<std::size_t>(r) * in_bytes, H,
                                 batch.dtype, row_.data(), /*streaming=*/false);
    }
    std::byte* out = batch.partials + static_cast<std::size_t>(r) * out_bytes;
    if (batch.partial_dtype == DType::kF32) {
      kernels.weighted_sum(inputs_.data(), weights_.data(), count, H, reinterpret_cast<float*>(out),
                           streaming);
    } else {
      kernels.weighted_sum_bf16(inputs_.data(), weights_.data(), count, H,
                                reinterpret_cast<std::uint16_t*>(out), streaming);
    }
  }
  if (streaming) kernels.fence();
}

}  // namespace switchyard

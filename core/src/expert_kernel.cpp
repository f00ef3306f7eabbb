// The checks every expert kernel makes on its batch (expert_kernel.hpp).
#include "switchyard/expert_kernel.hpp"

#include <algorithm>

#include "switchyard/status.hpp"

namespace switchyard {

std::int64_t check_expert_batch(const ExpertBatch& batch, std::int64_t hidden,
                                std::size_t num_experts, Device device,
                                const ExpertBatchNames& names) {
  const std::string& kernel = names.kernel;
  batch.input.require_on(device, names.input, DType::kF32, {-1, hidden});
  const std::int64_t N = batch.input.dim(0);
  batch.output.require_on(device, names.output, DType::kF32, {N, hidden});
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

}  // namespace switchyard

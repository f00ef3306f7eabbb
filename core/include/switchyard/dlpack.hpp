#pragma once
/// \file
/// Conversion between `TensorView` and DLPack's `DLTensor`, without copies.
/// This header is separate from tensor.hpp so that only users who want DLPack need
/// its header (Debian: libdlpack-dev).

#include <dlpack/dlpack.h>

#include "switchyard/tensor.hpp"

namespace switchyard {

/// A view of the memory a `DLTensor` describes (byte_offset applied, strides honoured;
/// a null `strides` means row-major). Throws `Error(kInvalidArgument)` for dtypes or
/// devices Switchyard does not handle, or for more than `kMaxTensorRank` dimensions.
TensorView from_dlpack(const DLTensor& tensor);

/// Storage for the shape and strides a `DLTensor` points to; keep it alive as long as
/// the `DLTensor` filled by `to_dlpack` is used.
struct DLTensorShape {
  std::int64_t shape[kMaxTensorRank] = {};
  std::int64_t strides[kMaxTensorRank] = {};
};

/// Describes `view` as a `DLTensor` whose shape and strides point into `storage`.
DLTensor to_dlpack(const TensorView& view, DLTensorShape& storage);

}  // namespace switchyard

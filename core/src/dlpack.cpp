#include "switchyard/dlpack.hpp"

#include "switchyard/status.hpp"

namespace switchyard {
namespace {

DType dtype_from_dlpack(DLDataType t) {
  if (t.lanes == 1) {
    if (t.code == kDLFloat && t.bits == 32) return DType::kF32;
    if (t.code == kDLFloat && t.bits == 16) return DType::kF16;
    if (t.code == kDLFloat && t.bits == 64) return DType::kF64;
    if (t.code == kDLBfloat && t.bits == 16) return DType::kBF16;
    if (t.code == kDLInt && t.bits == 32) return DType::kI32;
    if (t.code == kDLInt && t.bits == 64) return DType::kI64;
    if (t.code == kDLUInt && t.bits == 8) return DType::kU8;
  }
  throw Error(ErrorCode::kInvalidArgument, "DLPack dtype (code " + std::to_string(t.code) +
                                               ", bits " + std::to_string(t.bits) + ", lanes " +
                                               std::to_string(t.lanes) + ") is not supported");
}

DLDataType dtype_to_dlpack(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return {kDLFloat, 32, 1};
    case DType::kF16:
      return {kDLFloat, 16, 1};
    case DType::kF64:
      return {kDLFloat, 64, 1};
    case DType::kBF16:
      return {kDLBfloat, 16, 1};
    case DType::kI32:
      return {kDLInt, 32, 1};
    case DType::kI64:
      return {kDLInt, 64, 1};
    case DType::kU8:
      return {kDLUInt, 8, 1};
    case DType::kF8E4M3:
      break;  // this DLPack has no FP8 code
  }
  throw Error(ErrorCode::kInvalidArgument,
              std::string(dtype_name(dtype)) + " tensors have no DLPack type code here");
}

}  // namespace

TensorView from_dlpack(const DLTensor& tensor) {
  Device device;
  switch (tensor.device.device_type) {
    case kDLCPU:
      device = Device::host();
      break;
    case kDLCUDA:
      device = Device::cuda(tensor.device.device_id);
      break;
    default:
      throw Error(ErrorCode::kInvalidArgument, "DLPack device type " +
                                                   std::to_string(tensor.device.device_type) +
                                                   " is not supported (host and CUDA are)");
  }
  if (tensor.ndim < 0 || tensor.ndim > kMaxTensorRank) {
    throw Error(ErrorCode::kInvalidArgument, "DLPack tensor has " + std::to_string(tensor.ndim) +
                                                 " dimensions; at most " +
                                                 std::to_string(kMaxTensorRank) + " are supported");
  }
  const auto ndim = static_cast<std::size_t>(tensor.ndim);
  auto* data = static_cast<std::byte*>(tensor.data) + tensor.byte_offset;
  std::span<const std::int64_t> shape(tensor.shape, ndim);
  const DType dtype = dtype_from_dlpack(tensor.dtype);
  if (tensor.strides == nullptr) return TensorView(data, dtype, shape, device);
  return TensorView(data, dtype, shape, std::span<const std::int64_t>(tensor.strides, ndim),
                    device);
}

DLTensor to_dlpack(const TensorView& view, DLTensorShape& storage) {
  DLTensor t{};
  t.data = view.data();
  t.device = view.device().kind == Device::Kind::kCuda ? DLDevice{kDLCUDA, view.device().ordinal}
                                                       : DLDevice{kDLCPU, 0};
  t.ndim = view.rank();
  t.dtype = dtype_to_dlpack(view.dtype());
  for (int i = 0; i < view.rank(); ++i) {
    storage.shape[i] = view.dim(i);
    storage.strides[i] = view.stride(i);
  }
  t.shape = storage.shape;
  t.strides = storage.strides;
  t.byte_offset = 0;
  return t;
}

}  // namespace switchyard

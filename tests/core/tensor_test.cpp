#include <doctest/doctest.h>

#include <cmath>
#include <limits>

#include "switchyard/dlpack.hpp"
#include "switchyard/status.hpp"
#include "switchyard/tensor.hpp"
#include "switchyard/topology.hpp"

using namespace switchyard;

TEST_CASE("TensorView describes contiguous and strided layouts") {
  float data[12] = {};
  TensorView v(data, DType::kF32, {3, 4});
  CHECK(v.rank() == 2);
  CHECK(v.numel() == 12);
  CHECK(v.stride(0) == 4);
  CHECK(v.stride(1) == 1);
  CHECK(v.is_contiguous());
  CHECK(v.describe() == "f32[3,4]");
  const std::int64_t shape[] = {4, 3};
  const std::int64_t strides[] = {1, 4};  // a transposed view
  TensorView t(data, DType::kF32, shape, strides);
  CHECK_FALSE(t.is_contiguous());
  CHECK_THROWS_AS(t.require("x", DType::kF32, {4, 3}), Error);
  // No elements, any strides (PyTorch's empty slices): contiguous, nothing to lay out.
  const std::int64_t empty_shape[] = {0, 3};
  const TensorView empty(data, DType::kF32, empty_shape, strides);
  CHECK(empty.is_contiguous());
  CHECK_NOTHROW(empty.require("x", DType::kF32, {-1, 3}));
  CHECK_NOTHROW(v.require("x", DType::kF32, {-1, 4}));
  try {
    v.require("tokens", DType::kF32, {-1, 5});
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kInvalidArgument);
    CHECK(e.message() == "tokens: expected f32[*,5] contiguous host tensor, got f32[3,4]");
  }
}

TEST_CASE("DLPack round trip keeps pointer, dtype, shape, strides and device") {
  std::uint16_t data[6] = {};
  TensorView v(data, DType::kBF16, {2, 3}, Device::cuda(1));
  DLTensorShape storage;
  DLTensor dl = to_dlpack(v, storage);
  CHECK(dl.data == data);
  CHECK(dl.dtype.code == kDLBfloat);
  CHECK(dl.device.device_type == kDLCUDA);
  CHECK(dl.device.device_id == 1);
  TensorView back = from_dlpack(dl);
  CHECK(back.data() == data);
  CHECK(back.dtype() == DType::kBF16);
  CHECK(back.dim(0) == 2);
  CHECK(back.dim(1) == 3);
  CHECK(back.device() == Device::cuda(1));

  // byte_offset and null strides (row-major) are honoured.
  float f[8] = {};
  std::int64_t shape[] = {2, 2};
  DLTensor raw{};
  raw.data = f;
  raw.byte_offset = 4 * sizeof(float);
  raw.device = {kDLCPU, 0};
  raw.ndim = 2;
  raw.dtype = {kDLFloat, 32, 1};
  raw.shape = shape;
  TensorView offset = from_dlpack(raw);
  CHECK(offset.data() == f + 4);
  CHECK(offset.is_contiguous());
  raw.dtype = {kDLFloat, 32, 4};  // vector lanes are not supported
  CHECK_THROWS_AS(from_dlpack(raw), Error);
}

TEST_CASE("bf16 and f16 conversions") {
  CHECK(bf16_to_float(float_to_bf16(1.0f)) == 1.0f);
  CHECK(bf16_to_float(float_to_bf16(-2.5f)) == -2.5f);
  // Round to nearest even: 1 + 2^-8 is halfway between two bf16 values.
  CHECK(bf16_to_float(float_to_bf16(1.0f + std::ldexp(1.0f, -8))) == 1.0f);
  CHECK(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(f16_to_float(0x3c00) == 1.0f);
  CHECK(f16_to_float(0xc000) == -2.0f);
  CHECK(f16_to_float(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(std::isinf(f16_to_float(0x7c00)));
}

TEST_CASE("Topology groups ranks into nodes") {
  Topology t = Topology::uniform(5, 2);
  CHECK(t.num_nodes() == 3);
  CHECK(t.node_of(4) == 2);
  CHECK(t.ranks_on(1) == std::vector<int>{2, 3});
  CHECK(t.describe() ==
        "5 ranks on 3 nodes: node 0 = ranks 0-1, node 1 = ranks 2-3, node 2 = rank 4");
  Topology renumbered({7, 7, 3});
  CHECK(renumbered.node_of(0) == 0);
  CHECK(renumbered.node_of(2) == 1);
  CHECK_THROWS_AS(Topology::uniform(4, 0), Error);
}

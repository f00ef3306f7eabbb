// Payload conversions against hand-worked E4M3 codes, and payload row sizes. The host data
// path's primitives are checked by the data-path conformance suite
// (tests/plugins/data_path_conformance.cpp), which every data path passes.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <vector>

#include "switchyard/data_path.hpp"
#include "switchyard/layer.hpp"
#include "switchyard/stream.hpp"

using namespace switchyard;

TEST_CASE("FP8 E4M3 codes: exact values, ties to even, saturation, subnormals, NaN") {
  // sign | exponent (bias 7) << 3 | mantissa
  CHECK(float_to_fp8_e4m3(1.0f) == 0x38);
  CHECK(float_to_fp8_e4m3(0.5f) == 0x30);
  CHECK(float_to_fp8_e4m3(-3.5f) == 0xC6);  // 1.75 * 2^1
  CHECK(float_to_fp8_e4m3(448.0f) == 0x7E);
  CHECK(float_to_fp8_e4m3(500.0f) == 0x7E);  // saturates, never NaN
  CHECK(float_to_fp8_e4m3(-1e9f) == 0xFE);
  CHECK(float_to_fp8_e4m3(1.0625f) == 0x38);       // halfway 1.0 / 1.125: even mantissa 0
  CHECK(float_to_fp8_e4m3(1.1875f) == 0x3A);       // halfway 1.125 / 1.25: even mantissa 2
  CHECK(float_to_fp8_e4m3(0.001953125f) == 0x01);  // 2^-9, the smallest subnormal
  CHECK(float_to_fp8_e4m3(0.015625f) == 0x08);     // 2^-6, the smallest normal
  CHECK(float_to_fp8_e4m3(0.0f) == 0x00);
  CHECK(std::isnan(fp8_e4m3_to_float(float_to_fp8_e4m3(std::nanf("")))));
  CHECK(fp8_e4m3_to_float(0x7E) == 448.0f);
  CHECK(fp8_e4m3_to_float(0x01) == 0.001953125f);
  CHECK(fp8_e4m3_to_float(0xC6) == -3.5f);
  // Every code but NaN survives a round trip.
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7F) == 0x7F) continue;
    const float v = fp8_e4m3_to_float(static_cast<std::uint8_t>(code));
    if (v == 0.0f) continue;  // -0 encodes as 0x80, +0 as 0x00: both fine
    CHECK(float_to_fp8_e4m3(v) == code);
  }
}

TEST_CASE("payload row sizes are multiples of 4 and fp8 rows carry one scale per 128") {
  CHECK(payload_row_bytes(PayloadDType::kF32, 5) == 20);
  CHECK(payload_row_bytes(PayloadDType::kBF16, 5) == 12);
  CHECK(payload_row_bytes(PayloadDType::kFP8, 128) == 4 + 128);
  CHECK(payload_row_bytes(PayloadDType::kFP8, 129) == 8 + 132);
  CHECK(parse_payload_dtype("fp8") == PayloadDType::kFP8);
  CHECK_THROWS_AS(parse_payload_dtype("int4"), Error);
}

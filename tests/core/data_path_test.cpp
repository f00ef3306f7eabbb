// Payload conversions against hand-worked E4M3 codes, and the host data path's layout on a
// hand-worked plan, grouping and weighted reduce.
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

TEST_CASE("pack pads each row to 4 bytes with zeros, whatever the buffer held") {
  auto path = make_host_data_path();
  HostStream stream;
  // One token of 3 elements: bf16 rows of 6 bytes padded to 8; fp8 rows of one scale,
  // 3 codes and one zero byte. 1.0 is bf16 0x3f80; 2.0 is 0x4000; -0.5 is 0xbf00.
  const float x[3] = {1.0f, 2.0f, -0.5f};
  const std::int64_t token = 0;
  std::byte bf16_row[8];
  std::memset(bf16_row, 0xAB, sizeof bf16_row);
  path->pack(PackArgs{x, 3, &token, 1, PayloadDType::kBF16, bf16_row}, stream);
  const unsigned char bf16_expected[8] = {0x80, 0x3f, 0x00, 0x40, 0x00, 0xbf, 0, 0};
  CHECK(std::memcmp(bf16_row, bf16_expected, 8) == 0);
  std::byte fp8_row[8];
  std::memset(fp8_row, 0xAB, sizeof fp8_row);
  path->pack(PackArgs{x, 3, &token, 1, PayloadDType::kFP8, fp8_row}, stream);
  CHECK(fp8_row[7] == std::byte{0});
}

TEST_CASE("pack_runs: each run's rows into its own buffer, tokens shared between runs") {
  auto path = make_host_data_path();
  HostStream stream;
  // Four tokens of 3 elements, x[t][h] = t + h / 4 (exact in bf16). Send rows in three runs
  // (destinations): {0, 2, 3}, {}, {1, 2}; the runs' buffers are apart and start dirty.
  float x[12];
  for (int t = 0; t < 4; ++t) {
    for (int h = 0; h < 3; ++h)
      x[t * 3 + h] = static_cast<float>(t) + 0.25f * static_cast<float>(h);
  }
  const std::int64_t tokens[5] = {0, 2, 3, 1, 2};
  std::uint16_t first[3 * 4], second[2 * 4], unused[4];
  std::memset(first, 0xAB, sizeof first);
  std::memset(second, 0xAB, sizeof second);
  std::memset(unused, 0xAB, sizeof unused);
  const PackRun runs[3] = {{0, 3, reinterpret_cast<std::byte*>(first)},
                           {3, 0, reinterpret_cast<std::byte*>(unused)},
                           {3, 2, reinterpret_cast<std::byte*>(second)}};
  PackArgs args;
  args.x = x;
  args.hidden = 3;
  args.send_row_token = tokens;
  args.dtype = PayloadDType::kBF16;
  path->pack_runs(args, runs, stream);
  // bf16 of a float whose low 16 bits are zero is its high 16 bits; rows pad to 8 bytes.
  auto expected_row = [&](std::int64_t t, const std::uint16_t* row) {
    for (int h = 0; h < 3; ++h) {
      std::uint32_t bits = 0;
      std::memcpy(&bits, &x[t * 3 + h], 4);
      CHECK(row[h] == static_cast<std::uint16_t>(bits >> 16));
    }
    CHECK(row[3] == 0);
  };
  expected_row(0, first);
  expected_row(2, first + 4);
  expected_row(3, first + 8);
  expected_row(1, second);
  expected_row(2, second + 4);
  CHECK(unused[0] == 0xABAB);
}

TEST_CASE("layout: one row per (token, destination rank), slots in routing order") {
  // Experts 0,1 on rank 0; 2,3 on rank 1.
  const ExpertPlacement placement(4, 2);
  const std::int32_t experts[] = {0, 1, 2, 3, 3, 0, -1, -1};
  const float weights[] = {0.5f, 0.5f, 0.25f, 0.75f, 2.0f, 1.0f, 0.0f, 0.0f};
  auto path = make_host_data_path();
  HostStream stream;
  std::int64_t rows_to[2] = {-7, -7};
  path->layout_counts({experts, 4, 2, &placement, rows_to}, stream);
  CHECK(rows_to[0] == 2);  // tokens 0 and 2
  CHECK(rows_to[1] == 2);  // tokens 1 and 2
  const std::int64_t offsets[] = {0, 2};
  std::int64_t token[4] = {};
  SlotMeta meta[8] = {};
  LayoutArgs args;
  args.experts = experts;
  args.weights = weights;
  args.num_tokens = 4;
  args.slots = 2;
  args.placement = &placement;
  args.rows_to_offset = offsets;
  args.send_row_token = token;
  args.send_meta = meta;
  path->layout(args, stream);
  CHECK(token[0] == 0);
  CHECK(token[1] == 2);
  CHECK(token[2] == 1);
  CHECK(token[3] == 2);
  CHECK(meta[0].local_expert == 0);  // token 0 on rank 0: experts 0 and 1
  CHECK(meta[1].local_expert == 1);
  CHECK(meta[2].local_expert == 0);  // token 2 on rank 0: expert 0 only
  CHECK(meta[2].weight == 1.0f);
  CHECK(meta[3].local_expert == -1);
  CHECK(meta[4].local_expert == 0);  // token 1 on rank 1: experts 2, 3 as local 0, 1
  CHECK(meta[5].local_expert == 1);
  CHECK(meta[5].weight == 0.75f);
  CHECK(meta[6].local_expert == 1);  // token 2 on rank 1: expert 3
  CHECK(meta[6].weight == 2.0f);
}

TEST_CASE("group_by_expert: rows per local expert in arrival order, into f32 or bf16 rows") {
  auto path = make_host_data_path();
  HostStream stream;
  // Three received rows of 4 elements, two slots each, two local experts:
  //   row 0 -> experts 1, 0;  row 1 -> (empty), 1;  row 2 -> 0, (empty).
  // Expert 0 gets rows 0, 2 (expert rows 0, 1); expert 1 gets rows 0, 1 (expert rows 2, 3).
  // The values round to bf16 by hand (ulp 2^-7 at 1): 1 + 2^-9 down, 1 + 3·2^-9 up, the
  // ties 1 + 2^-8 and 1 + 3·2^-8 to the even mantissa (0 and 2).
  const float x[3][4] = {{1.0f, 1.0f + 0x1p-9f, 1.0f + 3 * 0x1p-9f, -2.5f},
                         {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 0.0f, 3.0f},
                         {-1.0f, 0.5f, 0x1p-10f, 100.0f}};
  const std::uint16_t x_bf16[3][4] = {{0x3F80, 0x3F80, 0x3F81, 0xC020},
                                      {0x3F80, 0x3F82, 0x0000, 0x4040},
                                      {0xBF80, 0x3F00, 0x3A80, 0x42C8}};
  const SlotMeta meta[6] = {{1, 0.5f}, {0, 0.5f}, {-1, 0.0f}, {1, 1.0f}, {0, 1.0f}, {-1, 0.0f}};
  const std::int64_t expected_assignment[6] = {2, 0, -1, 3, 1, -1};
  const int expert_row_of[4] = {0, 2, 0, 1};  // received row in expert rows 0..3
  const std::int64_t tokens[3] = {0, 1, 2};
  for (PayloadDType payload : {PayloadDType::kF32, PayloadDType::kBF16, PayloadDType::kFP8}) {
    CAPTURE(payload_dtype_name(payload));
    const std::size_t row_bytes = payload_row_bytes(payload, 4);
    std::vector<std::byte> rows(3 * row_bytes);
    path->pack(PackArgs{&x[0][0], 4, tokens, 3, payload, rows.data()}, stream);
    std::int64_t per_expert[2] = {-1, -1};
    path->count_groups(GroupCountArgs{meta, 3, 2, 2, per_expert}, stream);
    CHECK(per_expert[0] == 2);
    CHECK(per_expert[1] == 2);
    for (DType out : {DType::kF32, DType::kBF16}) {
      CAPTURE(dtype_name(out));
      std::vector<std::byte> grouped(4 * 4 * dtype_size(out), std::byte{0xAB});
      std::int64_t assignment[6];
      std::fill(std::begin(assignment), std::end(assignment), 7);
      GroupArgs args{rows.data(), meta,           3,          2,  4, payload, 2,
                     per_expert,  grouped.data(), assignment, out};
      path->group_by_expert(args, stream);
      CHECK(std::equal(std::begin(assignment), std::end(assignment), expected_assignment));
      for (int a = 0; a < 4; ++a) {
        const int r = expert_row_of[a];
        for (int h = 0; h < 4; ++h) {
          // An fp8 payload's element: its code times its row's scale (one block of 128).
          float sent = x[r][h];
          if (payload == PayloadDType::kFP8) {
            float scale = 0;
            std::memcpy(&scale, rows.data() + static_cast<std::size_t>(r) * row_bytes, 4);
            const auto code = static_cast<std::uint8_t>(rows[r * row_bytes + 4 + h]);
            sent = fp8_e4m3_to_float(code) * scale;
          }
          if (out == DType::kF32) {
            float got = 0;
            std::memcpy(&got, grouped.data() + (a * 4 + h) * 4, 4);
            const float expected =
                payload == PayloadDType::kBF16 ? bf16_to_float(x_bf16[r][h]) : sent;
            CHECK(got == expected);
          } else {
            std::uint16_t got = 0;
            std::memcpy(&got, grouped.data() + (a * 4 + h) * 2, 2);
            if (payload == PayloadDType::kFP8) {
              CHECK(got == float_to_bf16(sent));
            } else {
              CHECK(got == x_bf16[r][h]);
            }
          }
        }
      }
    }
  }
  // Expert rows in another dtype are refused.
  std::int64_t per_expert[2] = {2, 2}, assignment[6];
  std::byte rows[3 * 16], grouped[64];
  path->pack(PackArgs{&x[0][0], 4, tokens, 3, PayloadDType::kF32, rows}, stream);
  GroupArgs args{rows, meta,       3,       2,          4,          PayloadDType::kF32,
                 2,    per_expert, grouped, assignment, DType::kF16};
  CHECK_THROWS_AS(path->group_by_expert(args, stream), Error);
}

TEST_CASE("weighted_reduce: each row's weighted slots from f32 or bf16 expert rows") {
  auto path = make_host_data_path();
  HostStream stream;
  // Three expert rows of 4 elements, each value exact in bf16 (so that both dtypes hold the
  // same numbers), and two received rows of two slots:
  //   row 0 = 0.5 · e2 + 0.25 · e0 = {-1.25, 0, 4.125, 0.8125}
  //   row 1 = (empty) + 2 · e1     = {8, 0.5, -2, 4}
  // every sum exact in f32 and in bf16.
  const float e_f32[3][4] = {
      {1.0f, -2.0f, 0.5f, 3.0f}, {4.0f, 0.25f, -1.0f, 2.0f}, {-3.0f, 1.0f, 8.0f, 0.125f}};
  const std::uint16_t e_bf16[3][4] = {{0x3F80, 0xC000, 0x3F00, 0x4040},
                                      {0x4080, 0x3E80, 0xBF80, 0x4000},
                                      {0xC040, 0x3F80, 0x4100, 0x3E00}};
  const SlotMeta meta[4] = {{2, 0.5f}, {0, 0.25f}, {-1, 0.0f}, {1, 2.0f}};
  const std::int64_t assignment[4] = {2, 0, -1, 1};
  const float expected[2][4] = {{-1.25f, 0.0f, 4.125f, 0.8125f}, {8.0f, 0.5f, -2.0f, 4.0f}};
  const std::uint16_t expected_bf16[2][4] = {{0xBFA0, 0x0000, 0x4084, 0x3F50},
                                             {0x4100, 0x3F00, 0xC000, 0x4080}};
  for (DType in : {DType::kF32, DType::kBF16}) {
    for (DType out : {DType::kF32, DType::kBF16}) {
      CAPTURE(dtype_name(in));
      CAPTURE(dtype_name(out));
      std::vector<std::byte> partials(2 * 4 * dtype_size(out), std::byte{0xAB});
      WeightedReduceArgs args;
      args.expert_output = in == DType::kF32 ? reinterpret_cast<const std::byte*>(&e_f32[0][0])
                                             : reinterpret_cast<const std::byte*>(&e_bf16[0][0]);
      args.expert_output_dtype = in;
      args.meta = meta;
      args.assignment_of_slot = assignment;
      args.num_rows = 2;
      args.slots = 2;
      args.hidden = 4;
      args.combine_dtype = out;
      args.partial_rows = partials.data();
      path->weighted_reduce(args, stream);
      for (int r = 0; r < 2; ++r) {
        for (int h = 0; h < 4; ++h) {
          if (out == DType::kF32) {
            float got = 0;
            std::memcpy(&got, partials.data() + (r * 4 + h) * 4, 4);
            CHECK(got == expected[r][h]);
          } else {
            std::uint16_t got = 0;
            std::memcpy(&got, partials.data() + (r * 4 + h) * 2, 2);
            CHECK(got == expected_bf16[r][h]);
          }
        }
      }
    }
  }
  // Expert rows in another dtype are refused.
  std::vector<std::byte> partials(2 * 4 * 4);
  WeightedReduceArgs args;
  args.expert_output = reinterpret_cast<const std::byte*>(&e_bf16[0][0]);
  args.expert_output_dtype = DType::kF16;
  args.meta = meta;
  args.assignment_of_slot = assignment;
  args.num_rows = 2;
  args.slots = 2;
  args.hidden = 4;
  args.partial_rows = partials.data();
  CHECK_THROWS_AS(path->weighted_reduce(args, stream), Error);
}

#include "data_path_conformance.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <iterator>
#include <memory>
#include <vector>

#include "switchyard/placement.hpp"
#include "switchyard/status.hpp"

namespace switchyard::conformance {
namespace {

/// Buffers in the data path's memory, filled from and read back to the host through its
/// `copy`; freed with this object.
class Space {
 public:
  Space(DataPath& path, Stream& stream) : path_(path), stream_(stream) {}
  ~Space() {
    for (const auto& [p, bytes] : blocks_) path_.allocator().deallocate(p, bytes);
  }
  Space(const Space&) = delete;
  Space& operator=(const Space&) = delete;

  /// A buffer holding a copy of `values`.
  template <typename T>
  T* put(const std::vector<T>& values) {
    const std::size_t bytes = std::max<std::size_t>(values.size() * sizeof(T), 1);
    void* p = path_.allocator().allocate(bytes);
    blocks_.emplace_back(p, bytes);
    if (!values.empty()) path_.copy(p, values.data(), values.size() * sizeof(T), stream_);
    stream_.synchronize();  // the host vector may go
    return static_cast<T*>(p);
  }
  /// A buffer of `count` elements every byte of which is `fill`.
  template <typename T>
  T* dirty(std::size_t count, unsigned char fill = 0xAB) {
    std::vector<unsigned char> bytes(count * sizeof(T), fill);
    return reinterpret_cast<T*>(put(bytes));
  }
  /// `count` elements at `p`, after the stream's work.
  template <typename T>
  std::vector<T> get(const T* p, std::size_t count) {
    std::vector<T> out(count);
    stream_.synchronize();
    if (count > 0) path_.copy(out.data(), p, count * sizeof(T), stream_);
    stream_.synchronize();
    return out;
  }

 private:
  DataPath& path_;
  Stream& stream_;
  std::vector<std::pair<void*, std::size_t>> blocks_;
};

std::uint16_t bits_of_bf16(float exact) {
  std::uint32_t bits = 0;
  std::memcpy(&bits, &exact, 4);
  return static_cast<std::uint16_t>(bits >> 16);
}

float float_of(const std::vector<std::byte>& bytes, std::size_t offset) {
  float f = 0;
  std::memcpy(&f, bytes.data() + offset, 4);
  return f;
}

void router_logits_case(DataPath& path, Stream& stream) {
  Space space(path, stream);
  // x [2,3] · gateᵀ with gate [2,3]; every product and sum exact in f32.
  const std::vector<float> x = {1.0f, 2.0f, 3.0f, -1.0f, 0.5f, 4.0f};
  const std::vector<float> gate = {0.5f, 0.25f, 1.0f, 2.0f, -1.0f, 0.0f};
  const Device d = path.device();
  float* logits = space.dirty<float>(4);
  path.router_logits(TensorView(space.put(x), DType::kF32, {2, 3}, d),
                     TensorView(space.put(gate), DType::kF32, {2, 3}, d),
                     TensorView(logits, DType::kF32, {2, 2}, d), stream);
  CHECK(space.get(logits, 4) == std::vector<float>{4.0f, 0.0f, 3.625f, -2.5f});
}

void layout_case(DataPath& path, Stream& stream) {
  Space space(path, stream);
  // Experts 0,1 on rank 0; 2,3 on rank 1. Token 3 has no expert.
  const ExpertPlacement placement(4, 2);
  const std::int32_t* experts = space.put(std::vector<std::int32_t>{0, 1, 2, 3, 3, 0, -1, -1});
  const float* weights =
      space.put(std::vector<float>{0.5f, 0.5f, 0.25f, 0.75f, 2.0f, 1.0f, 0.0f, 0.0f});
  std::int64_t rows_to[2] = {-7, -7};  // host
  path.layout_counts({experts, 4, 2, &placement, rows_to}, stream);
  // Host results are written when the call returns: read without waiting.
  CHECK(rows_to[0] == 2);  // tokens 0 and 2
  CHECK(rows_to[1] == 2);  // tokens 1 and 2
  // With the slots per expert: e0 by tokens 0 and 2, e1 by 0, e2 by 1, e3 by 1 and 2.
  std::int64_t slots_to_expert[4] = {-7, -7, -7, -7};
  rows_to[0] = rows_to[1] = -7;
  path.layout_counts({experts, 4, 2, &placement, rows_to, slots_to_expert}, stream);
  CHECK(rows_to[0] == 2);
  CHECK(rows_to[1] == 2);
  CHECK(std::vector<std::int64_t>(slots_to_expert, slots_to_expert + 4) ==
        std::vector<std::int64_t>{2, 1, 1, 2});
  const std::int64_t offsets[] = {0, 2};
  auto* token = space.dirty<std::int64_t>(4);
  auto* meta = space.dirty<SlotMeta>(8);
  LayoutArgs args;
  args.experts = experts;
  args.weights = weights;
  args.num_tokens = 4;
  args.slots = 2;
  args.placement = &placement;
  args.rows_to_offset = offsets;
  args.send_row_token = token;
  args.send_meta = meta;
  path.layout(args, stream);
  CHECK(space.get(token, 4) == std::vector<std::int64_t>{0, 2, 1, 2});
  const auto m = space.get(meta, 8);
  CHECK(m[0].local_expert == 0);  // token 0 on rank 0: experts 0 and 1
  CHECK(m[1].local_expert == 1);
  CHECK(m[2].local_expert == 0);  // token 2 on rank 0: expert 0 only
  CHECK(m[2].weight == 1.0f);
  CHECK(m[3].local_expert == -1);
  CHECK(m[4].local_expert == 0);  // token 1 on rank 1: experts 2, 3 as local 0, 1
  CHECK(m[5].local_expert == 1);
  CHECK(m[5].weight == 0.75f);
  CHECK(m[6].local_expert == 1);  // token 2 on rank 1: expert 3
  CHECK(m[6].weight == 2.0f);
  CHECK(m[7].local_expert == -1);
}

void pack_case(DataPath& path, Stream& stream) {
  Space space(path, stream);
  // One token of 3 elements: bf16 rows of 6 bytes padded to 8; fp8 rows of one scale (the
  // row's largest magnitude over 448), 3 codes and one zero byte; f32 rows as they are.
  // 1.0 is bf16 0x3f80, 2.0 0x4000, -0.5 0xbf00. With scale 2/448, 1.0 is 224 = 1.75·2^7
  // (E4M3 0x76), 2.0 is 448 (0x7e), -0.5 is -112 = -1.75·2^6 (0xee).
  const float* x = space.put(std::vector<float>{1.0f, 2.0f, -0.5f});
  const std::int64_t* token = space.put(std::vector<std::int64_t>{0});
  auto* row = space.dirty<std::byte>(12);
  path.pack(PackArgs{x, 3, token, 1, PayloadDType::kBF16, row}, stream);
  const auto bf16 = space.get(row, 8);
  const unsigned char bf16_expected[8] = {0x80, 0x3f, 0x00, 0x40, 0x00, 0xbf, 0, 0};
  CHECK(std::memcmp(bf16.data(), bf16_expected, 8) == 0);
  path.pack(PackArgs{x, 3, token, 1, PayloadDType::kFP8, row}, stream);
  const auto fp8 = space.get(row, 8);
  CHECK(float_of(fp8, 0) == 2.0f / 448.0f);
  CHECK(fp8[4] == std::byte{0x76});
  CHECK(fp8[5] == std::byte{0x7e});
  CHECK(fp8[6] == std::byte{0xee});
  CHECK(fp8[7] == std::byte{0});
  path.pack(PackArgs{x, 3, token, 1, PayloadDType::kF32, row}, stream);
  const auto f32 = space.get(row, 12);
  CHECK(float_of(f32, 0) == 1.0f);
  CHECK(float_of(f32, 4) == 2.0f);
  CHECK(float_of(f32, 8) == -0.5f);
}

void pack_runs_case(DataPath& path, Stream& stream) {
  Space space(path, stream);
  // Four tokens of 3 elements, x[t][h] = t + h / 4 (exact in bf16). Rows in three runs
  // (destinations): {0, 2, 3}, {}, {1, 2}; the runs' buffers are apart and start dirty.
  std::vector<float> xs(12);
  for (int t = 0; t < 4; ++t) {
    for (int h = 0; h < 3; ++h)
      xs[static_cast<std::size_t>(t * 3 + h)] =
          static_cast<float>(t) + 0.25f * static_cast<float>(h);
  }
  const float* x = space.put(xs);
  const std::int64_t* tokens = space.put(std::vector<std::int64_t>{0, 2, 3, 1, 2});
  auto* first = space.dirty<std::uint16_t>(12);
  auto* second = space.dirty<std::uint16_t>(8);
  auto* unused = space.dirty<std::uint16_t>(4);
  const PackRun runs[3] = {{0, 3, reinterpret_cast<std::byte*>(first)},
                           {3, 0, reinterpret_cast<std::byte*>(unused)},
                           {3, 2, reinterpret_cast<std::byte*>(second)}};
  PackArgs args;
  args.x = x;
  args.hidden = 3;
  args.send_row_token = tokens;
  args.dtype = PayloadDType::kBF16;
  path.pack_runs(args, runs, stream);
  auto expected = [&](std::initializer_list<int> ts) {
    std::vector<std::uint16_t> rows;
    for (const int t : ts) {
      for (int h = 0; h < 3; ++h)
        rows.push_back(bits_of_bf16(xs[static_cast<std::size_t>(t * 3 + h)]));
      rows.push_back(0);  // rows pad to 8 bytes
    }
    return rows;
  };
  CHECK(space.get(first, 12) == expected({0, 2, 3}));
  CHECK(space.get(second, 8) == expected({1, 2}));
  CHECK(space.get(unused, 1)[0] == 0xABAB);
}

void group_case(DataPath& path, Stream& stream) {
  Space space(path, stream);
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
  const SlotMeta* meta = space.put(
      std::vector<SlotMeta>{{1, 0.5f}, {0, 0.5f}, {-1, 0.0f}, {1, 1.0f}, {0, 1.0f}, {-1, 0.0f}});
  const std::vector<std::int64_t> expected_assignment = {2, 0, -1, 3, 1, -1};
  const int expert_row_of[4] = {0, 2, 0, 1};  // received row in expert rows 0..3
  const float* xs = space.put(std::vector<float>(&x[0][0], &x[0][0] + 12));
  const std::int64_t* tokens = space.put(std::vector<std::int64_t>{0, 1, 2});
  for (PayloadDType payload : {PayloadDType::kF32, PayloadDType::kBF16, PayloadDType::kFP8}) {
    CAPTURE(payload_dtype_name(payload));
    const std::size_t row_bytes = payload_row_bytes(payload, 4);
    auto* rows = space.dirty<std::byte>(3 * row_bytes);
    path.pack(PackArgs{xs, 4, tokens, 3, payload, rows}, stream);
    const auto packed = space.get(rows, 3 * row_bytes);
    std::int64_t per_expert[2] = {-1, -1};  // host
    path.count_groups(GroupCountArgs{meta, 3, 2, 2, per_expert}, stream);
    stream.synchronize();
    CHECK(per_expert[0] == 2);
    CHECK(per_expert[1] == 2);
    for (DType out : {DType::kF32, DType::kBF16}) {
      CAPTURE(dtype_name(out));
      auto* grouped = space.dirty<std::byte>(4 * 4 * dtype_size(out));
      auto* assignment = space.dirty<std::int64_t>(6, 7);
      GroupArgs args{rows, meta, 3, 2, 4, payload, 2, per_expert, grouped, assignment, out};
      path.group_by_expert(args, stream);
      CHECK(space.get(assignment, 6) == expected_assignment);
      const auto g = space.get(grouped, 4 * 4 * dtype_size(out));
      for (int a = 0; a < 4; ++a) {
        const int r = expert_row_of[a];
        for (int h = 0; h < 4; ++h) {
          // An fp8 payload's element: its code times its row's scale (one block of 128).
          float sent = x[r][h];
          if (payload == PayloadDType::kFP8) {
            const float scale = float_of(packed, static_cast<std::size_t>(r) * row_bytes);
            const auto code = static_cast<std::uint8_t>(packed[r * row_bytes + 4 + h]);
            sent = fp8_e4m3_to_float(code) * scale;
          }
          if (out == DType::kF32) {
            const float got = float_of(g, static_cast<std::size_t>((a * 4 + h) * 4));
            CHECK(got == (payload == PayloadDType::kBF16 ? bf16_to_float(x_bf16[r][h]) : sent));
          } else {
            std::uint16_t got = 0;
            std::memcpy(&got, g.data() + (a * 4 + h) * 2, 2);
            CHECK(got == (payload == PayloadDType::kFP8 ? float_to_bf16(sent) : x_bf16[r][h]));
          }
        }
      }
    }
  }
  // Expert rows in another dtype are refused.
  std::int64_t per_expert[2] = {2, 2};
  auto* rows = space.dirty<std::byte>(3 * 16);
  path.pack(PackArgs{xs, 4, tokens, 3, PayloadDType::kF32, rows}, stream);
  GroupArgs args{rows,
                 meta,
                 3,
                 2,
                 4,
                 PayloadDType::kF32,
                 2,
                 per_expert,
                 space.dirty<std::byte>(64),
                 space.dirty<std::int64_t>(6),
                 DType::kF16};
  CHECK_THROWS_AS(path.group_by_expert(args, stream), Error);
}

void weighted_reduce_case(DataPath& path, Stream& stream) {
  Space space(path, stream);
  // Three expert rows of 4 elements, each value exact in bf16, and two received rows of two
  // slots: row 0 = 0.5 · e2 + 0.25 · e0 = {-1.25, 0, 4.125, 0.8125};
  // row 1 = (empty) + 2 · e1 = {8, 0.5, -2, 4}: every sum exact in f32 and in bf16.
  const std::vector<float> e_f32 = {1.0f,  -2.0f, 0.5f,  3.0f, 4.0f, 0.25f,
                                    -1.0f, 2.0f,  -3.0f, 1.0f, 8.0f, 0.125f};
  std::vector<std::uint16_t> e_bf16;
  for (const float v : e_f32) e_bf16.push_back(bits_of_bf16(v));
  const SlotMeta* meta =
      space.put(std::vector<SlotMeta>{{2, 0.5f}, {0, 0.25f}, {-1, 0.0f}, {1, 2.0f}});
  const std::int64_t* assignment = space.put(std::vector<std::int64_t>{2, 0, -1, 1});
  const std::vector<float> expected = {-1.25f, 0.0f, 4.125f, 0.8125f, 8.0f, 0.5f, -2.0f, 4.0f};
  const std::byte* inputs[2] = {reinterpret_cast<const std::byte*>(space.put(e_f32)),
                                reinterpret_cast<const std::byte*>(space.put(e_bf16))};
  for (int i = 0; i < 2; ++i) {
    const DType in = i == 0 ? DType::kF32 : DType::kBF16;
    for (DType out : {DType::kF32, DType::kBF16}) {
      CAPTURE(dtype_name(in));
      CAPTURE(dtype_name(out));
      auto* partials = space.dirty<std::byte>(2 * 4 * dtype_size(out));
      WeightedReduceArgs args;
      args.expert_output = inputs[i];
      args.expert_output_dtype = in;
      args.meta = meta;
      args.assignment_of_slot = assignment;
      args.num_rows = 2;
      args.slots = 2;
      args.hidden = 4;
      args.combine_dtype = out;
      args.partial_rows = partials;
      path.weighted_reduce(args, stream);
      const auto got = space.get(partials, 2 * 4 * dtype_size(out));
      for (std::size_t k = 0; k < expected.size(); ++k) {
        if (out == DType::kF32) {
          CHECK(float_of(got, 4 * k) == expected[k]);
        } else {
          std::uint16_t bits = 0;
          std::memcpy(&bits, got.data() + 2 * k, 2);
          CHECK(bits == bits_of_bf16(expected[k]));
        }
      }
    }
  }
  // Expert rows in another dtype are refused.
  WeightedReduceArgs args;
  args.expert_output = inputs[1];
  args.expert_output_dtype = DType::kF16;
  args.meta = meta;
  args.assignment_of_slot = assignment;
  args.num_rows = 2;
  args.slots = 2;
  args.hidden = 4;
  args.partial_rows = space.dirty<std::byte>(32);
  CHECK_THROWS_AS(path.weighted_reduce(args, stream), Error);
}

void unpermute_sum_case(DataPath& path, Stream& stream) {
  Space space(path, stream);
  // Three combined rows of 2 elements for tokens 1, 0, 1 of three (token 2 has none):
  // y = {{3, 4}, {1.5, 1}, {0, 0}}, exact; the same from bf16 rows (exact values).
  const std::vector<float> rows = {1.0f, 2.0f, 3.0f, 4.0f, 0.5f, -1.0f};
  std::vector<std::uint16_t> rows_bf16;
  for (const float v : rows) rows_bf16.push_back(bits_of_bf16(v));
  const std::int64_t* token = space.put(std::vector<std::int64_t>{1, 0, 1});
  const std::byte* combined[2] = {reinterpret_cast<const std::byte*>(space.put(rows)),
                                  reinterpret_cast<const std::byte*>(space.put(rows_bf16))};
  for (int i = 0; i < 2; ++i) {
    CAPTURE(i);
    float* y = space.dirty<float>(6, 0xFF);  // NaN
    path.unpermute_sum({combined[i], token, 3, 2, i == 0 ? DType::kF32 : DType::kBF16, y, 3},
                       stream);
    CHECK(space.get(y, 6) == std::vector<float>{3.0f, 4.0f, 1.5f, 1.0f, 0.0f, 0.0f});
  }
}

void backward_primitives_case(DataPath& path, Stream& stream) {
  Space space(path, stream);
  // Two received rows of two slots over three grouped rows of 2 elements:
  //   row 0 -> grouped 2 (weight 0.5), grouped 0 (weight -2); row 1 -> none, grouped 1 (4).
  const SlotMeta* meta =
      space.put(std::vector<SlotMeta>{{1, 0.5f}, {0, -2.0f}, {-1, 0.0f}, {0, 4.0f}});
  const std::int64_t* assignment = space.put(std::vector<std::int64_t>{2, 0, -1, 1});
  const float* rows = space.put(std::vector<float>{1.0f, 2.0f, -0.5f, 0.25f, 3.0f, -4.0f});
  const float* outputs = space.put(std::vector<float>{2.0f, 0.5f, 8.0f, 4.0f, -1.0f, 0.125f});
  SlotRowsArgs args;
  args.meta = meta;
  args.assignment_of_slot = assignment;
  args.num_rows = 2;
  args.slots = 2;
  args.hidden = 2;
  auto* scaled = space.dirty<float>(6);
  auto* dots = space.dirty<float>(4);
  try {
    path.scale_grouped_rows(args, rows, scaled, stream);
    path.slot_dot_products(args, rows, outputs, dots, stream);
  } catch (const Error& e) {
    // A data path without the backward's primitives says so.
    CHECK(e.code() == ErrorCode::kUnavailable);
    return;
  }
  // grouped 0 · -2, grouped 1 · 4, grouped 2 · 0.5: every product exact.
  CHECK(space.get(scaled, 6) == std::vector<float>{-2.0f, -4.0f, -2.0f, 1.0f, 1.5f, -2.0f});
  // <rows[a], outputs[a]>: a = 2: -3 - 0.5; a = 0: 2 + 1; none: 0; a = 1: -4 + 1.
  CHECK(space.get(dots, 4) == std::vector<float>{-3.5f, 3.0f, 0.0f, -3.0f});
}

void copy_case(DataPath& path, Stream& stream) {
  Space space(path, stream);
  std::vector<std::int32_t> values(1000);
  for (std::size_t i = 0; i < values.size(); ++i)
    values[i] = static_cast<std::int32_t>(i * 7 - 300);
  const std::int32_t* a = space.put(values);
  auto* b = space.dirty<std::int32_t>(values.size());
  path.copy(b, a, values.size() * sizeof(std::int32_t), stream);  // within its memory
  CHECK(space.get(b, values.size()) == values);
}

void streams_case(DataPath& path, Stream& stream) {
  // A second stream of the data path stands for a caller's own.
  const std::unique_ptr<Stream> caller = path.create_stream(true);
  std::unique_ptr<Stream> borrowed;
  try {
    borrowed = path.borrow_stream(caller->native_handle());
  } catch (const Error& e) {
    // A data path whose calls are done when they return has no streams to borrow.
    CHECK(e.code() == ErrorCode::kUnavailable);
    return;
  }
  CHECK(borrowed->native_handle() == caller->native_handle());
  CHECK(borrowed->device() == path.device());
  // A copy on the caller's stream, then, ordered after it by an event, a copy of its result
  // on `stream`: out of order, the second reads the poison.
  Space space(path, stream);
  std::vector<std::int32_t> values(1 << 16);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<std::int32_t>(i * 3 + 1);
  const std::int32_t* a = space.put(values);
  auto* b = space.dirty<std::int32_t>(values.size());
  auto* c = space.dirty<std::int32_t>(values.size());
  const std::size_t bytes = values.size() * sizeof(std::int32_t);
  path.copy(b, a, bytes, *borrowed);
  const std::unique_ptr<StreamEvent> copied = borrowed->create_event();
  borrowed->record(*copied);
  stream.wait(*copied);
  path.copy(c, b, bytes, stream);
  CHECK(space.get(c, values.size()) == values);
  borrowed.reset();       // leaves the caller's stream alone
  caller->synchronize();  // which still works
}

}  // namespace

void run_data_path_suite(DataPath& path, Stream& stream) {
  CAPTURE(device_name(path.device()));
  SUBCASE("router_logits") { router_logits_case(path, stream); }
  SUBCASE("layout_counts and layout") { layout_case(path, stream); }
  SUBCASE("pack: f32, bf16 and fp8 rows with their padding") { pack_case(path, stream); }
  SUBCASE("pack_runs") { pack_runs_case(path, stream); }
  SUBCASE("count_groups and group_by_expert") { group_case(path, stream); }
  SUBCASE("weighted_reduce") { weighted_reduce_case(path, stream); }
  SUBCASE("unpermute_sum") { unpermute_sum_case(path, stream); }
  SUBCASE("the backward's scale_grouped_rows and slot_dot_products, or kUnavailable") {
    backward_primitives_case(path, stream);
  }
  SUBCASE("copy") { copy_case(path, stream); }
  SUBCASE("borrow_stream and Stream::wait, or kUnavailable") { streams_case(path, stream); }
}

}  // namespace switchyard::conformance

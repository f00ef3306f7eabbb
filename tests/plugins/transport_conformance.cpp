#include "transport_conformance.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <numeric>

#include "switchyard/status.hpp"

namespace switchyard::conformance {
namespace {

std::uint8_t pattern(int from, int to, std::size_t i) {
  return static_cast<std::uint8_t>((from * 31 + to * 7 + static_cast<int>(i) * 13) & 0xff);
}

/// alltoallv where rank `from` sends `bytes(from, to)` bytes to rank `to`; checks content.
void exchange(Transport& t, Stream& s, const std::function<std::size_t(int, int)>& bytes) {
  const int n = t.size(), me = t.rank();
  std::vector<std::size_t> sc(static_cast<std::size_t>(n)), so(sc.size()), rc(sc.size()),
      ro(sc.size());
  std::size_t send_total = 0, recv_total = 0;
  for (int p = 0; p < n; ++p) {
    const auto i = static_cast<std::size_t>(p);
    sc[i] = bytes(me, p);
    so[i] = send_total;
    send_total += sc[i];
    rc[i] = bytes(p, me);
    ro[i] = recv_total;
    recv_total += rc[i];
  }
  std::vector<std::byte> send(send_total), recv(recv_total + 1, std::byte{0xee});
  for (int p = 0; p < n; ++p) {
    for (std::size_t i = 0; i < sc[static_cast<std::size_t>(p)]; ++i) {
      send[so[static_cast<std::size_t>(p)] + i] = std::byte{pattern(me, p, i)};
    }
  }
  AlltoallvBuffers b{send.data(), sc, so, recv.data(), rc, ro};
  t.alltoallv(b, s);
  s.synchronize();
  bool ok = true;
  for (int p = 0; p < n; ++p) {
    for (std::size_t i = 0; i < rc[static_cast<std::size_t>(p)]; ++i) {
      ok = ok && recv[ro[static_cast<std::size_t>(p)] + i] == std::byte{pattern(p, me, i)};
    }
  }
  CHECK(ok);
  CHECK(recv[recv_total] == std::byte{0xee});  // nothing written past the end
}

template <typename T>
void allreduce_case(Transport& t, Stream& stream, DType dtype) {
  const int n = t.size(), me = t.rank();
  auto value = [](int rank, int i) { return static_cast<T>(0.1 * (rank + 1) + i * 3 - rank * 2); };
  std::vector<T> sum(5), max(5), min(5);
  for (int i = 0; i < 5; ++i) {
    sum[static_cast<std::size_t>(i)] = value(me, i);
    max[static_cast<std::size_t>(i)] = value(me, i);
    min[static_cast<std::size_t>(i)] = value(me, i);
  }
  // Three reductions queued before one synchronize.
  t.allreduce(sum.data(), 5, dtype, ReduceOp::kSum, stream);
  t.allreduce(max.data(), 5, dtype, ReduceOp::kMax, stream);
  t.allreduce(min.data(), 5, dtype, ReduceOp::kMin, stream);
  stream.synchronize();
  for (int i = 0; i < 5; ++i) {
    T s = value(0, i), hi = value(0, i), lo = value(0, i);
    for (int r = 1; r < n; ++r) {  // rank order: the result is bit-identical
      s += value(r, i);
      hi = std::max(hi, value(r, i));
      lo = std::min(lo, value(r, i));
    }
    if (t.capabilities().deterministic_reductions) {
      CHECK(sum[static_cast<std::size_t>(i)] == s);  // rank order, bit for bit
    } else {
      CHECK(static_cast<double>(sum[static_cast<std::size_t>(i)]) ==
            doctest::Approx(static_cast<double>(s)).epsilon(1e-6));
    }
    CHECK(max[static_cast<std::size_t>(i)] == hi);
    CHECK(min[static_cast<std::size_t>(i)] == lo);
  }
}

}  // namespace

std::vector<NamedCase> standard_cases() {
  std::vector<NamedCase> cases;
  cases.push_back({"identity", [](Transport& t, Stream& /*s*/) {
                     CHECK(t.size() >= 1);
                     CHECK(t.rank() >= 0);
                     CHECK(t.rank() < t.size());
                     CHECK(t.topology().size() == t.size());
                     CHECK(t.capabilities().host_memory);
                   }});
  cases.push_back({"alltoall", [](Transport& t, Stream& s) {
                     const int n = t.size();
                     std::vector<std::int64_t> send(static_cast<std::size_t>(n)), recv(send.size());
                     for (int p = 0; p < n; ++p)
                       send[static_cast<std::size_t>(p)] = t.rank() * 1000 + p;
                     t.alltoall(send.data(), recv.data(), sizeof(std::int64_t), s);
                     s.synchronize();
                     for (int p = 0; p < n; ++p)
                       CHECK(recv[static_cast<std::size_t>(p)] == p * 1000 + t.rank());
                   }});
  cases.push_back(
      {"alltoallv uneven sizes, zero counts and self-send", [](Transport& t, Stream& s) {
         exchange(t, s, [](int from, int to) {
           return static_cast<std::size_t>(((from + to) % 3) * 5 + (from == to ? 7 : 0));
         });
       }});
  cases.push_back({"alltoallv all counts zero", [](Transport& t, Stream& s) {
                     exchange(t, s, [](int, int) { return std::size_t{0}; });
                   }});
  cases.push_back({"alltoallv one peer only", [](Transport& t, Stream& s) {
                     const int last = t.size() - 1;
                     exchange(t, s, [last](int from, int to) {
                       return from == 0 && to == last ? std::size_t{1000} : std::size_t{0};
                     });
                   }});
  cases.push_back({"alltoallv repeated 100 times with changing sizes", [](Transport& t, Stream& s) {
                     for (int step = 0; step < 100; ++step) {
                       exchange(t, s, [step](int from, int to) {
                         return static_cast<std::size_t>((from * 3 + to * 5 + step) % 17);
                       });
                     }
                   }});
  cases.push_back({"alltoallv large payloads (4 MiB per peer)", [](Transport& t, Stream& s) {
                     exchange(t, s, [](int from, int to) {
                       return std::size_t{4} << 20 | static_cast<std::size_t>(from + to);
                     });
                   }});
  cases.push_back({"allreduce f32 f64 i32 i64", [](Transport& t, Stream& s) {
                     allreduce_case<float>(t, s, DType::kF32);
                     allreduce_case<double>(t, s, DType::kF64);
                     allreduce_case<std::int32_t>(t, s, DType::kI32);
                     allreduce_case<std::int64_t>(t, s, DType::kI64);
                   }});
  cases.push_back({"queued alltoallv, alltoall and allreduce read back after one synchronize",
                   [](Transport& t, Stream& s) {
                     const int n = t.size(), me = t.rank();
                     const auto un = static_cast<std::size_t>(n);
                     std::vector<std::size_t> counts(un, sizeof(int)), offsets(un);
                     for (std::size_t p = 0; p < un; ++p) offsets[p] = p * sizeof(int);
                     std::vector<int> send(un), recv(un, -1), again(un, -1);
                     for (int p = 0; p < n; ++p) send[static_cast<std::size_t>(p)] = me * 100 + p;
                     double total = me + 1;
                     t.alltoallv({reinterpret_cast<std::byte*>(send.data()), counts, offsets,
                                  reinterpret_cast<std::byte*>(recv.data()), counts, offsets},
                                 s);
                     t.alltoall(send.data(), again.data(), sizeof(int), s);
                     t.allreduce(&total, 1, DType::kF64, ReduceOp::kSum, s);
                     s.synchronize();
                     for (int p = 0; p < n; ++p) {
                       CHECK(recv[static_cast<std::size_t>(p)] == p * 100 + me);
                       CHECK(again[static_cast<std::size_t>(p)] == p * 100 + me);
                     }
                     CHECK(total == n * (n + 1) / 2.0);
                   }});
  cases.push_back({"barrier", [](Transport& t, Stream& /*s*/) {
                     for (int i = 0; i < 10; ++i) t.barrier();
                   }});
  cases.push_back(
      {"ialltoallv with test() and two requests in flight", [](Transport& t, Stream& /*s*/) {
         const int n = t.size(), me = t.rank();
         std::vector<std::size_t> counts(static_cast<std::size_t>(n), sizeof(int)),
             offsets(counts.size());
         for (int p = 0; p < n; ++p)
           offsets[static_cast<std::size_t>(p)] = static_cast<std::size_t>(p) * sizeof(int);
         std::vector<int> send_a(counts.size()), send_b(counts.size()), recv_a(counts.size()),
             recv_b(counts.size());
         for (int p = 0; p < n; ++p) {
           send_a[static_cast<std::size_t>(p)] = me * 10 + p;
           send_b[static_cast<std::size_t>(p)] = -(me * 10 + p);
         }
         AlltoallvBuffers a{reinterpret_cast<std::byte*>(send_a.data()), counts, offsets,
                            reinterpret_cast<std::byte*>(recv_a.data()), counts, offsets};
         AlltoallvBuffers b{reinterpret_cast<std::byte*>(send_b.data()), counts, offsets,
                            reinterpret_cast<std::byte*>(recv_b.data()), counts, offsets};
         auto ra = t.ialltoallv(a);
         auto rb = t.ialltoallv(b);
         while (!rb->test()) {
         }
         ra->wait();
         for (int p = 0; p < n; ++p) {
           CHECK(recv_a[static_cast<std::size_t>(p)] == p * 10 + me);
           CHECK(recv_b[static_cast<std::size_t>(p)] == -(p * 10 + me));
         }
       }});
  cases.push_back({"split into groups with reversed keys", [](Transport& t, Stream& /*s*/) {
                     const int n = t.size(), me = t.rank();
                     auto sub = t.split(me % 2, -me);
                     REQUIRE(sub != nullptr);
                     const int group_size = (n - me % 2 + 1) / 2;
                     CHECK(sub->size() == group_size);
                     // Keys are -rank: the highest old rank becomes rank 0.
                     const int expected_rank = group_size - 1 - me / 2;
                     CHECK(sub->rank() == expected_rank);
                     std::vector<std::int64_t> send(static_cast<std::size_t>(sub->size()), me),
                         recv(send.size());
                     sub->alltoall(send.data(), recv.data(), sizeof(std::int64_t));
                     for (int p = 0; p < sub->size(); ++p) {
                       // New rank p holds old rank: the group's members in descending order.
                       const int old = me % 2 + 2 * (group_size - 1 - p);
                       CHECK(recv[static_cast<std::size_t>(p)] == old);
                     }
                     auto none = t.split(me == 0 ? -1 : 0, me);
                     CHECK((me == 0) == (none == nullptr));
                     if (none) CHECK(none->size() == n - 1);
                     t.barrier();  // the parent still works
                   }});
  cases.push_back(
      {"mismatched sizes are an error on the receiving rank", [](Transport& t, Stream& s) {
         const int n = t.size(), me = t.rank();
         std::vector<std::size_t> sc(static_cast<std::size_t>(n), 4), off(sc.size()),
             rc(sc.size(), 4);
         for (int p = 0; p < n; ++p)
           off[static_cast<std::size_t>(p)] = static_cast<std::size_t>(p) * 8;
         if (me == 0) rc[static_cast<std::size_t>(n - 1)] = 8;  // expects more than is sent
         std::vector<std::byte> send(static_cast<std::size_t>(n) * 8), recv(send.size());
         AlltoallvBuffers b{send.data(), sc, off, recv.data(), rc, off};
         if (me == 0) {
           // Thrown by the call, or for stream-ordered work by the synchronize.
           CHECK_THROWS_AS((t.alltoallv(b, s), s.synchronize()), Error);
         } else {
           t.alltoallv(b, s);
           s.synchronize();
         }
         t.barrier();
       }});
  return cases;
}

}  // namespace switchyard::conformance

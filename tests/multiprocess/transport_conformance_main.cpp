// The transport conformance suite in one process of a multi-process job: started N times
// by mpirun or `switchyard launch`, each process checks what its rank sees. The transport
// comes from SWITCHYARD_TEST_TRANSPORT (mpi or ucx); SWITCHYARD_TEST_MPI_MAX_MESSAGE, when
// set, makes the MPI transport split messages into chunks of that many bytes.
#include <doctest/doctest.h>

#include <cstdlib>

#include "../plugins/transport_conformance.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/status.hpp"

using namespace switchyard;

namespace {

struct World {
  PluginRegistry registry{PluginRegistry::default_search_path()};
  ConfigSection options;
  std::shared_ptr<Transport> transport;

  World() {
    const char* name = std::getenv("SWITCHYARD_TEST_TRANSPORT");
    REQUIRE(name != nullptr);
    Config config;
    if (const char* chunk = std::getenv("SWITCHYARD_TEST_MPI_MAX_MESSAGE")) {
      config.set("runtime", "mpi_max_message_bytes", std::int64_t{std::atoll(chunk)});
    }
    options = config.section("runtime", registry.options(PluginKind::kTransport, name));
    TransportCreateArgs args;
    args.options = &options;
    args.timeout_s = 60;
    transport = registry.create_transport(name, args).front();
  }
};

World& world() {
  static World w;
  return w;
}

}  // namespace

TEST_CASE("the transport passes the conformance suite in every process") {
  Transport& t = world().transport.operator*();
  for (const auto& c : conformance::standard_cases()) {
    CAPTURE(c.name);
    CAPTURE(t.rank());
    try {
      HostStream stream;
      c.run(t, stream);
    } catch (const Error& e) {
      FAIL(e.what());
    }
  }
}

TEST_CASE("payloads around the message-size limit") {
  Transport& t = world().transport.operator*();
  const int n = t.size(), me = t.rank();
  for (std::size_t bytes : {999u, 1000u, 1001u, 2000u, 2001u, 123457u}) {
    CAPTURE(bytes);
    std::vector<std::size_t> counts(static_cast<std::size_t>(n), bytes), offsets(counts.size());
    for (int p = 0; p < n; ++p)
      offsets[static_cast<std::size_t>(p)] = static_cast<std::size_t>(p) * bytes;
    std::vector<std::uint8_t> send(static_cast<std::size_t>(n) * bytes), recv(send.size());
    for (std::size_t i = 0; i < send.size(); ++i)
      send[i] = static_cast<std::uint8_t>((i * 7 + static_cast<std::size_t>(me) * 13) & 0xff);
    t.alltoallv({reinterpret_cast<std::byte*>(send.data()), counts, offsets,
                 reinterpret_cast<std::byte*>(recv.data()), counts, offsets});
    bool ok = true;
    for (int p = 0; p < n; ++p) {
      for (std::size_t i = 0; i < bytes; ++i) {
        const std::size_t sender_index = static_cast<std::size_t>(me) * bytes + i;
        ok = ok && recv[static_cast<std::size_t>(p) * bytes + i] ==
                       static_cast<std::uint8_t>(
                           (sender_index * 7 + static_cast<std::size_t>(p) * 13) & 0xff);
      }
    }
    CHECK(ok);
  }
}

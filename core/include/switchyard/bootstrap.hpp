#pragma once
/// \file
/// How a process learns its place in a launched job, and the TCP key-value store that
/// transports use to exchange addresses out of band (UCX endpoints, NCCL ids).

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace switchyard {

/// This process's place in a job, as the launcher described it.
struct LaunchInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr;  ///< store address (MASTER_ADDR); empty if not given
  int master_port = 0;      ///< store port (MASTER_PORT); 0 if not given
  /// Which variables it came from: "RANK/WORLD_SIZE", "Open MPI" or "Slurm".
  std::string source;
  /// The job's store secret (SWITCHYARD_STORE_TOKEN); empty means the per-user token file.
  std::string store_token;

  /// True when MASTER_ADDR and MASTER_PORT were given.
  bool has_store() const noexcept { return !master_addr.empty() && master_port > 0; }

  /// Reads torchrun's names (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
  /// MASTER_PORT) and SWITCHYARD_STORE_TOKEN (16 to 512 characters); rank and size fall back to
  /// Open MPI's (OMPI_COMM_WORLD_*) and then Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID)
  /// variables. Returns nullopt when no launcher variables are set. Throws
  /// `Error(kInvalidArgument)` for values that are not numbers or out of range (e.g. RANK >=
  /// WORLD_SIZE), naming the variable.
  static std::optional<LaunchInfo> from_environment();
};

/// Shortest and longest store token accepted.
inline constexpr std::size_t kMinStoreTokenChars = 16;
inline constexpr std::size_t kMaxStoreTokenChars = 512;

/// A fresh secret for one job's store: 32 bytes from the kernel's random source, as 64 hex
/// digits. `switchyard launch` gives one to its ranks in SWITCHYARD_STORE_TOKEN.
std::string new_store_token();

/// A TCP port of the loopback interface that is free now: bound to port 0, read back,
/// released. Another process may take it before the caller binds it. `switchyard launch`
/// gives one to its ranks in MASTER_PORT. Throws `Error(kSystem)` when no socket can be
/// bound.
int free_loopback_port();

/// A small key-value store over TCP, hosted by rank 0 and used by every rank during
/// start-up. Rank 0 listens on `master_addr:master_port` (that address only) and serves
/// from a background thread for as long as the object lives; every rank, rank 0 included,
/// is a client. Every wait is bounded by the timeout and ends in `Error(kTimeout)` that
/// names the operation and what was missing. Thread-safe.
///
/// Trust: a client must present the job's token before any request, or it is refused and
/// disconnected; without it nothing can be read or written. The token is `info.store_token`
/// (SWITCHYARD_STORE_TOKEN) or, when that is empty, the per-user token file
/// `$XDG_CONFIG_HOME/switchyard/store-token` (default `~/.config/switchyard/store-token`,
/// created with mode 600 at first use, refused if others can read it). It travels in clear
/// over the store's TCP connection: it keeps out other users of the machine, not someone who
/// can read the network. Frames are bounded (keys 1 KiB, values 1 MiB, all values 64 MiB);
/// a malformed frame, or one left unfinished for 5 s, closes that connection only; rank 0
/// serves every connection from one event loop, so no client can hold up another.
class BootstrapStore {
 public:
  /// Connects (and on rank 0 first listens). Checks that every rank agrees on the world
  /// size and that no rank number is taken twice. Throws `Error(kUnavailable)` when rank 0
  /// cannot listen (e.g. the port is in use) and `Error(kTimeout)` when the store cannot
  /// be reached in time.
  BootstrapStore(const LaunchInfo& info, double timeout_s);
  ~BootstrapStore();
  /// This process's store of the job `info` describes, shared by every transport the
  /// process builds: created at the first call and kept until the process exits, because
  /// rank 0 can listen on MASTER_PORT only once at a time and each rank joins the job once.
  /// A transport takes a `next_round()` and puts it in its keys, so that the exchanges of a
  /// later runtime never meet an earlier one's (every process builds its runtimes in the
  /// same order, so the rounds agree). Waits are bounded by the first call's timeout.
  /// Thread-safe.
  static std::shared_ptr<BootstrapStore> shared(const LaunchInfo& info, double timeout_s);
  /// 0, 1, 2, ... on successive calls: the number of this process's next use of the store.
  int next_round() noexcept;
  BootstrapStore(const BootstrapStore&) = delete;
  BootstrapStore& operator=(const BootstrapStore&) = delete;

  int rank() const noexcept;
  int world_size() const noexcept;

  /// Stores `value` under `key` (replacing any older value).
  void set(const std::string& key, const std::string& value);
  /// The value of `key`, waiting until some rank sets it.
  std::string get(const std::string& key);
  /// Returns once every rank has called `barrier(name)`; a timeout names the ranks that
  /// did not.
  void barrier(const std::string& name);
  /// Every rank contributes `value`; returns all values indexed by rank. A timeout names
  /// the ranks that did not contribute.
  std::vector<std::string> allgather(const std::string& name, const std::string& value);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace switchyard

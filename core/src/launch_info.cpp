#include <charconv>
#include <cstdlib>

#include "switchyard/bootstrap.hpp"
#include "switchyard/status.hpp"

namespace switchyard {
namespace {

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

int env_int(const char* name, const std::string& text, int min) {
  int value = 0;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || ptr != text.data() + text.size() || value < min) {
    throw Error(ErrorCode::kInvalidArgument, std::string("environment ") + name + "=" + text +
                                                 ": expected an integer >= " + std::to_string(min));
  }
  return value;
}

/// Reads the first of `names` that is set.
std::optional<std::pair<const char*, std::string>> first_of(
    std::initializer_list<const char*> names) {
  for (const char* n : names) {
    if (auto v = env(n)) return std::make_pair(n, *v);
  }
  return std::nullopt;
}

}  // namespace

std::optional<LaunchInfo> LaunchInfo::from_environment() {
  LaunchInfo info;
  // Each family of variables in order of precedence: torchrun, Open MPI, Slurm.
  struct Family {
    const char* source;
    const char* rank;
    const char* size;
    const char* local_rank;
    const char* local_size;
  };
  static constexpr Family kFamilies[] = {
      {"RANK/WORLD_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"},
      {"Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
       "OMPI_COMM_WORLD_LOCAL_SIZE"},
      {"Slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"},
  };
  const Family* found = nullptr;
  for (const auto& f : kFamilies) {
    if (env(f.rank) && env(f.size)) {
      found = &f;
      break;
    }
  }
  if (found == nullptr) return std::nullopt;
  info.source = found->source;
  info.rank = env_int(found->rank, *env(found->rank), 0);
  info.world_size = env_int(found->size, *env(found->size), 1);
  if (info.rank >= info.world_size) {
    throw Error(ErrorCode::kInvalidArgument,
                std::string("environment ") + found->rank + "=" + std::to_string(info.rank) +
                    " is not below " + found->size + "=" + std::to_string(info.world_size));
  }
  info.local_rank = info.rank;
  info.local_world_size = info.world_size;
  if (auto v = first_of({found->local_rank})) info.local_rank = env_int(v->first, v->second, 0);
  if (auto v = first_of({found->local_size}))
    info.local_world_size = env_int(v->first, v->second, 1);
  if (auto addr = env("MASTER_ADDR")) info.master_addr = *addr;
  if (auto port = env("MASTER_PORT")) info.master_port = env_int("MASTER_PORT", *port, 1);
  if (info.master_port > 65535) {
    throw Error(ErrorCode::kInvalidArgument,
                "environment MASTER_PORT=" + *env("MASTER_PORT") + ": not a TCP port");
  }
  if (auto token = env("SWITCHYARD_STORE_TOKEN")) {
    if (token->size() < kMinStoreTokenChars || token->size() > kMaxStoreTokenChars) {
      throw Error(ErrorCode::kInvalidArgument,
                  "environment SWITCHYARD_STORE_TOKEN: " + std::to_string(token->size()) +
                      " characters; a store token has 16 to 512 (e.g. 32 random hex digits)");
    }
    info.store_token = *token;
  }
  return info;
}

}  // namespace switchyard

#pragma once
// The subcommands of the `switchyard` tool. Each returns the process exit code.

#include <functional>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace switchyard::tool {

/// Exit codes shared by the subcommands.
inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 1;        // bad input, configuration or runtime failure
inline constexpr int kExitUsage = 2;        // bad command line
inline constexpr int kExitCheckFailed = 3;  // --check: result differs from the reference

int run_command(const std::vector<std::string>& args);
int plugins_command(const std::vector<std::string>& args);
int config_command(const std::vector<std::string>& args);
int launch_command(const std::vector<std::string>& args);
int route_command(const std::vector<std::string>& args);
int bench_command(const std::vector<std::string>& args);
int simulate_command(const std::vector<std::string>& args);
int backward_command(const std::vector<std::string>& args);
int plan_experts_command(const std::vector<std::string>& args);

}  // namespace switchyard::tool

#include "switchyard/config.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"

namespace switchyard::tool {

/// Prints "switchyard[ [rank R]]: error (<code>): <message>" to stderr.
void report_error(const Error& error);

/// Runs `body` (a subcommand's work on a built runtime) and returns its exit code. On an
/// `Error` it reports it and returns kExitError; unless every rank saw the error together
/// (bad input, a peer's failure) it first aborts the runtime so that peers stop.
int run_reporting_errors(Runtime& runtime, const std::function<int()>& body);

/// The [input] tokens of `runtime`'s configuration: the .npy file, or the synthetic ones;
/// `description` says which. `check(tokens, origin, keys)`, when given, runs before they
/// are read or made (a memory check).
HostTensor read_input_tokens(
    const Runtime& runtime, std::string& description,
    const std::function<void(std::int64_t, const std::string&, const std::string&)>& check = {});

/// Reads CONFIG, then applies SWITCHYARD_* environment overrides, then each `--set`.
Config load_config(const std::string& path, const std::vector<std::string>& sets);

/// A command line "CONFIG --FLAG VALUE... [--set section.key=value]...", in any order, of a
/// command whose flags each take a value and are all required.
struct ConfigCommandLine {
  std::string config_path;
  std::vector<std::string> values;  ///< values[i] belongs to the i-th of the parser's flags
  std::vector<std::string> sets;    ///< the --set overrides, in order
};

/// Takes an optional "FLAG VALUE" out of `args` (the last one given wins): its value, or
/// `fallback` when it is absent. The rest of `args` stays, in order, for
/// `parse_config_command_line`.
std::string take_optional_flag(std::vector<std::string>& args, std::string_view flag,
                               std::string fallback);

/// Parses `args` as a ConfigCommandLine with `flags` (e.g. {"--logits", "--out"}). On an
/// argument that fits none of them, a flag without its value, or CONFIG or a flag missing,
/// prints `usage` to stderr and returns nothing (the caller exits with kExitUsage).
std::optional<ConfigCommandLine> parse_config_command_line(
    const std::vector<std::string>& args, std::initializer_list<std::string_view> flags,
    const char* usage);

/// A command-line integer: all of `text` (no trailing characters, no wrap-around), within
/// [min, max]. Otherwise prints "switchyard COMMAND: FLAG needs an integer in [min, max],
/// not 'text'" to stderr and returns nothing (the caller exits with kExitUsage).
std::optional<long long> parse_integer_flag(const char* command, const char* flag,
                                            const std::string& text, long long min, long long max);
/// The same for a finite number of seconds within [min, max].
std::optional<double> parse_seconds_flag(const char* command, const char* flag,
                                         const std::string& text, double min, double max);

}  // namespace switchyard::tool

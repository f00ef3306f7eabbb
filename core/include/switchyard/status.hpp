#pragma once
/// \file
/// Error codes and the exception type every Switchyard API throws.

#include <exception>
#include <string>
#include <string_view>

namespace switchyard {

/// What went wrong, coarse enough to act on. Every error carries one of these.
enum class ErrorCode {
  kOk = 0,
  /// The caller passed something wrong: a bad config value, a tensor of the wrong
  /// shape or dtype, NaN logits. Fix the input; retrying the same call fails again.
  kInvalidArgument,
  /// A named thing does not exist: a plugin, a file, a tensor in a checkpoint.
  kNotFound,
  /// The thing exists but cannot work here (a transport whose library or launcher is
  /// missing, a device that is absent). The message says what is missing.
  kUnavailable,
  /// A plugin was built against another plugin ABI or another toolchain/core build.
  /// Rebuild the plugin with this core.
  kAbiMismatch,
  /// A peer or the bootstrap store did not answer in time; the message names the
  /// operation and the ranks that were missing.
  kTimeout,
  /// The operating system refused (I/O error, out of memory, cannot start a thread).
  kSystem,
  /// This operation failed only because another rank failed first; that rank reports
  /// the root cause.
  kPeerFailed,
  /// A broken invariant inside Switchyard or a plugin: a bug, please report it.
  kInternal,
};

/// Short stable name of a code, e.g. "invalid argument".
std::string_view error_code_name(ErrorCode code) noexcept;

/// The longest `timeout_s` accepted anywhere: a week. Longer is no longer a bound, and far
/// longer overflows the clocks that deadlines are computed on.
inline constexpr double kMaxTimeoutSeconds = 7 * 24 * 3600.0;

/// A duration for messages: "2 s", "1.5 s", "0.25 s".
std::string format_seconds(double seconds);

/// The exception thrown by Switchyard on any failure. `what()` is "<code name>: <message>".
/// Plugins convert their own exceptions to this type before they cross the plugin boundary.
class Error : public std::exception {
 public:
  Error(ErrorCode code, std::string message);

  ErrorCode code() const noexcept { return code_; }
  /// The message alone, without the code name.
  const std::string& message() const noexcept { return message_; }
  const char* what() const noexcept override { return what_.c_str(); }

 private:
  ErrorCode code_;
  std::string message_;
  std::string what_;
};

/// A code and a message, for APIs that report instead of throwing (plugin entry points,
/// `probe()`). Default-constructed means success.
struct Status {
  ErrorCode code = ErrorCode::kOk;
  std::string message;

  bool ok() const noexcept { return code == ErrorCode::kOk; }
  /// Throws `Error` when not ok.
  void throw_if_error() const;
  /// The status of the exception currently being handled; call only inside a catch block.
  static Status from_current_exception() noexcept;
};

}  // namespace switchyard

#include "switchyard/status.hpp"

#include <cstdio>
#include <new>
#include <system_error>

namespace switchyard {

std::string_view error_code_name(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kOk:
      return "ok";
    case ErrorCode::kInvalidArgument:
      return "invalid argument";
    case ErrorCode::kNotFound:
      return "not found";
    case ErrorCode::kUnavailable:
      return "unavailable";
    case ErrorCode::kAbiMismatch:
      return "ABI mismatch";
    case ErrorCode::kTimeout:
      return "timeout";
    case ErrorCode::kSystem:
      return "system error";
    case ErrorCode::kPeerFailed:
      return "peer failed";
    case ErrorCode::kInternal:
      return "internal error";
  }
  return "unknown error";
}

std::string format_seconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof text, "%g s", seconds);
  return text;
}

Error::Error(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {
  what_ = std::string(error_code_name(code_)) + ": " + message_;
}

void Status::throw_if_error() const {
  if (!ok()) throw Error(code, message);
}

Status Status::from_current_exception() noexcept {
  // Copying a message allocates; when even that fails, the code survives without words
  // (an empty string allocates nothing), rather than std::terminate through noexcept.
  try {
    try {
      throw;
    } catch (const Error& e) {
      return {e.code(), e.message()};
    } catch (const std::bad_alloc&) {
      return {ErrorCode::kSystem, "out of memory"};
    } catch (const std::system_error& e) {
      return {ErrorCode::kSystem, e.what()};
    } catch (const std::exception& e) {
      return {ErrorCode::kInternal, std::string("unexpected exception: ") + e.what()};
    } catch (...) {
      return {ErrorCode::kInternal, "unexpected exception of unknown type"};
    }
  } catch (...) {
    Status status;
    status.code = ErrorCode::kSystem;
    return status;
  }
}

}  // namespace switchyard

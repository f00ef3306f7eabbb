#pragma once
// Shared by the fuzz targets: the input as a file the readers can open by path (a memfd,
// so nothing touches the disk), and the one kind of failure a reader may report.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "switchyard/status.hpp"

namespace switchyard::fuzz {

/// The bytes as an anonymous in-memory file; `path()` names it through /proc/self/fd.
class MemoryFile {
 public:
  MemoryFile(const std::uint8_t* data, std::size_t size) {
    fd_ = ::memfd_create("fuzz-input", MFD_CLOEXEC);
    std::size_t written = 0;
    while (fd_ >= 0 && written < size) {
      const ssize_t n = ::write(fd_, data + written, size - written);
      if (n <= 0) break;
      written += static_cast<std::size_t>(n);
    }
  }
  ~MemoryFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  MemoryFile(const MemoryFile&) = delete;
  MemoryFile& operator=(const MemoryFile&) = delete;
  std::string path() const { return "/proc/self/fd/" + std::to_string(fd_); }

 private:
  int fd_ = -1;
};

/// A reader may refuse input only with `Error`: anything else escapes to libFuzzer and is
/// reported as a crash, like the sanitizers' findings.
template <typename Body>
void expect_only_errors(Body&& body) {
  try {
    body();
  } catch (const Error&) {
  }
}

}  // namespace switchyard::fuzz

// Outputs are written beside their final name and renamed into place: a reader sees the
// old file or the complete new one, and a failed write leaves nothing behind.
#include <unistd.h>

#include <fstream>

#include "switchyard/io.hpp"
#include "switchyard/status.hpp"

namespace switchyard {

void write_file_atomically(const std::filesystem::path& path,
                           const std::function<void(std::ostream&)>& write) {
  std::filesystem::path tmp = path;
  tmp += ".tmp" + std::to_string(::getpid());
  auto fail = [&](const std::string& why) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw Error(ErrorCode::kSystem, why);
  };
  try {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot write " + path.string() + " (cannot create " + tmp.string() + ")");
    write(out);
    out.flush();
    if (!out) fail("cannot write " + path.string() + " (disk full, or an I/O error)");
  } catch (const Error&) {
    throw;
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw;
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) fail("cannot rename " + tmp.string() + " to " + path.string() + ": " + ec.message());
}

}  // namespace switchyard

// The fault suite, launcher part: `switchyard launch` stopped by signals, killed outright,
// unable to start all its ranks, or stopping ranks that are themselves stopped. Each case
// checks the exit code, the time taken, and that no rank outlives the launcher.
#include <doctest/doctest.h>

#include <chrono>
#include <string>

#include "test_support.hpp"

using namespace switchyard;

namespace {

const std::string kTool = SWITCHYARD_TOOL_PATH;

/// Runs a bash script; returns its result and the seconds it took.
std::pair<test::CommandResult, double> timed_bash(const std::string& script,
                                                  const test::TempDir& dir) {
  test::write_text(dir / "case.sh",
                   "set -u\nTOOL='" + kTool + "'\nDIR='" + dir.path().string() + "'\n" + script);
  const auto start = std::chrono::steady_clock::now();
  auto r = test::run_command("bash " + (dir / "case.sh").string() + " 2>&1");
  return {r, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()};
}

/// Shell functions: start a launch of two ranks that record their pids and sleep, wait
/// until both are up, and check afterwards that none is alive (zombies count as gone).
const std::string kHelpers = R"sh(
start_sleepers() {
  "$TOOL" launch -n 2 -- sh -c 'echo $$ > "$0/pid.$RANK"; exec sleep 60' "$DIR" &
  LAUNCHER=$!
  for i in $(seq 100); do [ -s "$DIR/pid.0" ] && [ -s "$DIR/pid.1" ] && break; sleep 0.05; done
}
alive() { state=$(ps -o stat= -p "$1" 2>/dev/null); [ -n "$state" ] && [ "${state#Z}" = "$state" ]; }
check_gone() {
  for i in $(seq 40); do
    left=0
    for r in 0 1; do alive "$(cat "$DIR/pid.$r")" && left=1; done
    [ $left = 0 ] && { echo "ranks gone"; return; }
    sleep 0.05
  done
  echo "ranks left running"
}
)sh";

}  // namespace

TEST_CASE("a signal to the launcher stops every rank and exits 128 + the signal") {
  for (const auto& [signal, code] : std::initializer_list<std::pair<const char*, int>>{
           {"TERM", 143}, {"HUP", 129}, {"INT", 130}}) {
    CAPTURE(signal);
    test::TempDir dir;
    const auto [r, seconds] =
        timed_bash(kHelpers + "start_sleepers\nkill -" + signal +
                       " $LAUNCHER\nwait $LAUNCHER\necho \"launcher=$?\"\n" + "check_gone\n",
                   dir);
    INFO(r.output);
    CHECK(r.output.find("launcher=" + std::to_string(code)) != std::string::npos);
    CHECK(r.output.find("ranks gone") != std::string::npos);
    CHECK(seconds < 8);
  }
}

TEST_CASE("SIGKILL to the launcher: its ranks die with it") {
  test::TempDir dir;
  const auto [r, seconds] = timed_bash(
      kHelpers + "start_sleepers\nkill -KILL $LAUNCHER\nwait $LAUNCHER\ncheck_gone\n", dir);
  INFO(r.output);
  CHECK(r.output.find("ranks gone") != std::string::npos);
  CHECK(seconds < 8);
}

TEST_CASE("a stopped rank is continued and terminated within the grace period") {
  test::TempDir dir;
  // Rank 1 stops itself; rank 0 fails after half a second. With --grace 1 the launcher must
  // be done in about 1.5 s, not after the 5 s it gives before SIGKILL.
  const auto [r, seconds] = timed_bash(
      "\"$TOOL\" launch -n 2 --grace 1 -- sh -c "
      "'if [ $RANK = 0 ]; then sleep 0.5; exit 3; else kill -STOP $$; sleep 60; fi'\n"
      "echo \"launcher=$?\"\n",
      dir);
  INFO(r.output);
  CHECK(r.output.find("launcher=3") != std::string::npos);
  CHECK(r.output.find("rank 0 exited with 3; stopping the others") != std::string::npos);
  CHECK(seconds < 4);
}

TEST_CASE("a launch that cannot start every rank stops those it started") {
  test::TempDir dir;
  // 16 descriptors: the pipes of the first few ranks fit, the rest do not.
  const auto [r, seconds] = timed_bash(
      "(ulimit -n 16; \"$TOOL\" launch -n 12 -- sh -c 'echo $$ >> \"$0/pids\"; exec sleep 60' "
      "\"$DIR\"); echo \"launcher=$?\"\n"
      "sleep 0.3; left=0\n"
      "for p in $(cat \"$DIR/pids\" 2>/dev/null); do "
      "s=$(ps -o stat= -p $p); [ -n \"$s\" ] && [ \"${s#Z}\" = \"$s\" ] && left=1; done\n"
      "echo \"left=$left\"\n",
      dir);
  INFO(r.output);
  CHECK(r.output.find("launcher=1") != std::string::npos);
  CHECK(r.output.find("launch: cannot start rank ") != std::string::npos);
  CHECK(r.output.find("already started were stopped") != std::string::npos);
  CHECK(r.output.find("left=0") != std::string::npos);
  CHECK(seconds < 8);
}

TEST_CASE("the others get --grace to report, then are terminated; the first failure's code") {
  test::TempDir dir;
  const auto [r, seconds] = timed_bash(
      "\"$TOOL\" launch -n 3 --grace 1.5 -- sh -c "
      "'if [ $RANK = 1 ]; then exit 7; fi; trap \"echo rank $RANK got TERM; exit 0\" TERM; "
      "sleep 60 & wait'\n"
      "echo \"launcher=$?\"\n",
      dir);
  INFO(r.output);
  CHECK(r.output.find("launcher=7") != std::string::npos);
  CHECK(r.output.find("[rank 0] rank 0 got TERM") != std::string::npos);
  CHECK(r.output.find("[rank 2] rank 2 got TERM") != std::string::npos);
  CHECK(seconds >= 1.4);
  CHECK(seconds < 5);
}

TEST_CASE("a rank stopped while the others have finished is reported and stopped") {
  test::TempDir dir;
  const auto [r, seconds] = timed_bash(
      "\"$TOOL\" launch -n 2 --grace 1 -- sh -c "
      "'if [ $RANK = 1 ]; then kill -STOP $$; fi; echo rank $RANK done'\n"
      "echo \"launcher=$?\"\n",
      dir);
  INFO(r.output);
  CHECK(r.output.find("[rank 0] rank 0 done") != std::string::npos);
  CHECK(r.output.find("rank 1 is stopped (signal 19) while the others have finished") !=
        std::string::npos);
  CHECK(r.output.find("launcher=0") == std::string::npos);
  CHECK(seconds < 5);
}

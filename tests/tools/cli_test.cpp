// The `switchyard` tool end to end: every bad input named in the design and docs/routing.md
// gives a clear message, a non-zero exit, and writes nothing to the output path.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <limits>

#include <nlohmann/json.hpp>

#include "switchyard/io.hpp"
#include "switchyard/model.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

struct Case {
  test::TempDir dir;
  std::filesystem::path config = dir / "moe.toml";
  std::filesystem::path output = dir / "y.npy";

  /// Writes moe.toml: a 2-rank run writing y.npy, plus `extra` lines.
  void write_config(const std::string& extra, const std::string& router = "top_k = 2\n") {
    test::write_text(config, "[runtime]\ntransport = \"inproc\"\nranks = 2\n\n[router]\n" + router +
                                 "\n[model]\nnum_experts = 4\nhidden = 16\nffn_hidden = 32\n" +
                                 extra + "\n[output]\npath = \"y.npy\"\n");
  }
  test::CommandResult run(const std::string& extra_args = "") {
    return test::run_tool("run " + config.string() + " " + extra_args);
  }
};

/// Runs and expects failure with `message` and no output file.
void expect_failure(Case& c, const std::string& message, const std::string& args = "") {
  const auto result = c.run(args);
  INFO(result.output);
  CHECK(result.exit_code == 1);
  CHECK(result.output.find(message) != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(c.output));
}

void write_model(const std::filesystem::path& path, DType dtype) {
  const ModelWeights m = ModelWeights::random(4, 16, 32, 3);
  write_safetensors(path, test::checkpoint_tensors(m, "mixtral", dtype, ""));
}

}  // namespace

TEST_CASE("run --check succeeds and writes the output") {
  Case c;
  c.write_config("");
  const auto result = c.run("--check");
  INFO(result.output);
  CHECK(result.exit_code == 0);
  CHECK(result.output.find("check: max |y - reference|") != std::string::npos);
  CHECK(result.output.find("PASS") != std::string::npos);
  CHECK(result.output.find("expert load: e0=") != std::string::npos);
  CHECK(result.output.find("time (slowest rank") != std::string::npos);
  CHECK(result.output.find("bytes to other ranks") != std::string::npos);
  const HostTensor y = read_npy(c.output);
  CHECK(y.shape() == std::vector<std::int64_t>{64, 16});
}

TEST_CASE("run --rebalance-every: each rebalance reported, the output still checked") {
  Case c;
  c.write_config("");
  const auto result =
      c.run("--check --steps 3 --rebalance-every 2 --set runtime.redundant_experts=2");
  INFO(result.output);
  REQUIRE(result.exit_code == 0);
  // After step 2 of 3 only (none after the last step).
  CHECK(result.output.find("rebalance after step 2: layer 0: rank load ") != std::string::npos);
  CHECK(result.output.find("rebalance after step 1") == std::string::npos);
  CHECK(result.output.find("over 6 slots") != std::string::npos);  // 4 experts + 2 on 2 ranks
  CHECK(result.output.find("PASS") != std::string::npos);
  CHECK(c.run("--rebalance-every 0").exit_code == 2);
}

TEST_CASE("a failed --check exits with 3 and writes nothing") {
  Case c;
  c.write_config("");
  const auto result = c.run("--check --set check.tolerance=1e-12");
  INFO(result.output);
  CHECK(result.exit_code == 3);
  CHECK(result.output.find("FAIL") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(c.output));
}

TEST_CASE("tokens from .npy, output rows in input order, same as a single rank") {
  Case c;
  const HostTensor x = synthetic_tokens(13, 16, 4);
  write_npy(c.dir / "x.npy", x.view());
  c.write_config("\n[input]\ntokens = \"x.npy\"\n");
  const auto four = c.run("--set runtime.ranks=4");
  INFO(four.output);
  REQUIRE(four.exit_code == 0);
  CHECK(four.output.find("split 4/3/3/3") != std::string::npos);
  const HostTensor y4 = read_npy(c.output);
  const auto one = c.run("--set runtime.ranks=1");
  REQUIRE(one.exit_code == 0);
  const HostTensor y1 = read_npy(c.output);
  CHECK(y1.shape() == std::vector<std::int64_t>{13, 16});
  CHECK(test::relative_difference(y4, y1) <= 1e-5);
}

TEST_CASE("malformed TOML") {
  Case c;
  test::write_text(c.config, "[runtime\nranks = 2\n[output]\npath = \"y.npy\"\n");
  expect_failure(c, c.config.string() + ":1:9: malformed TOML");
}

TEST_CASE("unknown key with a suggestion, and unknown section") {
  Case c;
  c.write_config("", "topk = 2\n");
  expect_failure(c, c.config.string() + ":6:8: router.topk: unknown key (did you mean 'top_k'?)");
  c.write_config("\n[modle]\nseed = 1\n");
  expect_failure(c, "[modle]: unknown section (did you mean [model]?)");
}

TEST_CASE("an empty unknown section is refused too") {
  Case c;
  c.write_config("\n[rnutime]\n");
  expect_failure(c, "[rnutime]: unknown section (did you mean [runtime]?)");
}

TEST_CASE("integer and seconds flags parse strictly: usage error, nothing run") {
  Case c;
  c.write_config("");
  for (const char* steps : {"3abc", "4294967297", "0", ""}) {
    CAPTURE(steps);
    const auto result = c.run(std::string("--steps '") + steps + "'");
    CHECK(result.exit_code == 2);
    CHECK(result.output.find("--steps needs an integer in [1, 1073741824], not '" +
                             std::string(steps) + "'") != std::string::npos);
    CHECK_FALSE(std::filesystem::exists(c.output));
  }
  for (const char* grace : {"nan", "inf", "1e400", "-1", "2s"}) {
    CAPTURE(grace);
    const auto result = test::run_tool(std::string("launch -n 2 --grace ") + grace + " -- true");
    CHECK(result.exit_code == 2);
    CHECK(result.output.find("--grace needs a number of seconds in [0, 3600]") !=
          std::string::npos);
  }
  const auto bench = test::run_tool("bench " + c.config.string() + " --iters 10x");
  CHECK(bench.exit_code == 2);
  CHECK(bench.output.find("--iters needs an integer") != std::string::npos);
}

TEST_CASE("wrong type") {
  Case c;
  c.write_config("", "top_k = \"two\"\n");
  expect_failure(c, ":6:9: router.top_k: wrong type: expected integer, got string \"two\"");
}

TEST_CASE("top_k out of range, from the file and from --set") {
  Case c;
  c.write_config("", "top_k = 0\n");
  expect_failure(c, ":6:9: router.top_k: must be in 1..4");
  c.write_config("");
  expect_failure(c, "--set router.top_k=5: router.top_k: must be in 1..4", "--set router.top_k=5");
}

TEST_CASE("environment overrides the file; --set overrides the environment") {
  Case c;
  c.write_config("");
  const std::string env = "SWITCHYARD_ROUTER_TOP_K=9 ";
  const auto bad = test::run_command(env + SWITCHYARD_TOOL_PATH " run " + c.config.string());
  CHECK(bad.exit_code == 1);
  CHECK(bad.output.find("environment SWITCHYARD_ROUTER_TOP_K: router.top_k: must be in 1..4") !=
        std::string::npos);
  const auto good = test::run_command(env + SWITCHYARD_TOOL_PATH " run " + c.config.string() +
                                      " --set router.top_k=3");
  CHECK(good.exit_code == 0);
  CHECK(good.output.find("top_k 3") != std::string::npos);
}

TEST_CASE("missing and truncated safetensors, and a tensor of the wrong shape") {
  Case c;
  c.write_config("weights = \"absent.safetensors\"\n");
  expect_failure(c, "model.weights: " + (c.dir / "absent.safetensors").string() +
                        ": safetensors file does not exist");

  write_model(c.dir / "m.safetensors", DType::kBF16);
  std::filesystem::resize_file(c.dir / "m.safetensors",
                               std::filesystem::file_size(c.dir / "m.safetensors") - 64);
  c.write_config("weights = \"m.safetensors\"\n");
  expect_failure(c, "(truncated?)");

  const ModelWeights m = ModelWeights::random(4, 16, 32, 3);
  auto tensors = test::checkpoint_tensors(m, "mixtral", DType::kF32, "");
  tensors["experts.1.w3.weight"] = HostTensor(DType::kF32, {32, 15});
  write_safetensors(c.dir / "shape.safetensors", tensors);
  c.write_config("weights = \"shape.safetensors\"\n");
  expect_failure(c, "tensor experts.1.w3.weight has shape [32,15], expected [32,16]");
}

TEST_CASE("a checkpoint runs and checks in both formats") {
  Case c;
  write_model(c.dir / "m.safetensors", DType::kBF16);
  c.write_config("weights = \"m.safetensors\"\n");
  const auto result = c.run("--check");
  INFO(result.output);
  CHECK(result.exit_code == 0);
  CHECK(result.output.find("mixtral checkpoint") != std::string::npos);
}

TEST_CASE(".npy tokens of the wrong dtype or width") {
  Case c;
  HostTensor f64(DType::kF64, {5, 16});
  write_npy(c.dir / "f64.npy", f64.view());
  c.write_config("\n[input]\ntokens = \"f64.npy\"\n");
  expect_failure(c, "input.tokens: " + (c.dir / "f64.npy").string() +
                        " has dtype f64; expected float32 [rows, 16]");
  HostTensor narrow(DType::kF32, {5, 12});
  write_npy(c.dir / "narrow.npy", narrow.view());
  c.write_config("\n[input]\ntokens = \"narrow.npy\"\n");
  expect_failure(c, "has shape [5,12]; expected float32 [rows, 16]");
}

TEST_CASE("NaN in the tokens' logits") {
  Case c;
  HostTensor x = synthetic_tokens(6, 16, 1);
  x.data<float>()[4 * 16 + 2] = std::numeric_limits<float>::quiet_NaN();  // row 4: rank 1's row 1
  write_npy(c.dir / "x.npy", x.view());
  c.write_config("\n[input]\ntokens = \"x.npy\"\n");
  expect_failure(c, "rank 1 (input rows 3..5): router topk: logit of token 1, expert 0 is NaN");
}

TEST_CASE("a missing plugin names what is available and where it looked") {
  Case c;
  c.write_config("", "policy = \"capacityy\"\n");
  const auto result = c.run();
  CHECK(result.exit_code == 1);
  CHECK(result.output.find(":6:10: router.policy: router plugin \"capacityy\" not found") !=
        std::string::npos);
  // Named with their files, not loaded: nobody asked for them.
  CHECK(result.output.find("router plugins found: capacity (") != std::string::npos);
  CHECK(result.output.find(" topk (") != std::string::npos);
  CHECK(result.output.find("searched:") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(c.output));
}

TEST_CASE("usage errors exit with 2") {
  CHECK(test::run_tool("").exit_code == 2);
  CHECK(test::run_tool("frobnicate").exit_code == 2);
  CHECK(test::run_tool("run").exit_code == 2);
  CHECK(test::run_tool("run a.toml --steps 0").exit_code == 2);
  CHECK(test::run_tool("--help").exit_code == 0);
}

TEST_CASE("route and backward: every flag required, each with its value; nothing else taken") {
  for (const std::string bad :
       {"route a.toml --logits l.npy", "route a.toml --out d", "route --logits l.npy --out d",
        "route a.toml --logits l.npy --out", "route a.toml b.toml --logits l.npy --out d",
        "route a.toml --logits l.npy --out d --grad-output dy.npy",
        "route a.toml --logits l.npy --out d --set", "backward a.toml --out d",
        "backward a.toml --grad-output dy.npy", "backward a.toml --grad-output dy.npy --out d -x",
        "backward a.toml --logits l.npy --out d"}) {
    const auto result = test::run_tool(bad);
    INFO(bad);
    CHECK(result.exit_code == 2);
    CHECK(result.output.find("usage: switchyard " + bad.substr(0, bad.find(' '))) !=
          std::string::npos);
  }
  // Well formed, in any order: past the command line, to the missing file (exit 1).
  for (const std::string good :
       {"route missing.toml --logits l.npy --out d",
        "route --out d --set router.top_k=2 --logits l.npy missing.toml",
        "backward --grad-output dy.npy missing.toml --out d --set model.seed=1"}) {
    const auto result = test::run_tool(good);
    INFO(good);
    INFO(result.output);
    CHECK(result.exit_code == 1);
    CHECK(result.output.find("missing.toml") != std::string::npos);
  }
}

TEST_CASE("config show prints every effective value and its origin") {
  Case c;
  c.write_config("");
  const auto result = test::run_tool("config show " + c.config.string() + " --set model.seed=9");
  INFO(result.output);
  CHECK(result.exit_code == 0);
  CHECK(result.output.find("ranks = 2") != std::string::npos);
  CHECK(result.output.find(c.config.string() + ":3:9") != std::string::npos);
  CHECK(result.output.find("seed = 9") != std::string::npos);
  CHECK(result.output.find("--set model.seed=9") != std::string::npos);
  CHECK(result.output.find("score = \"softmax\"") != std::string::npos);  // a plugin key, defaulted
  CHECK(result.output.find("# weights (unset)") != std::string::npos);
  // Only schemas are needed: an MPI configuration can be shown outside mpirun.
  if (SWITCHYARD_TEST_HAVE_MPI) {
    const auto mpi =
        test::run_tool("config show " + c.config.string() + " --set runtime.transport=mpi");
    CHECK(mpi.exit_code == 0);
    CHECK(mpi.output.find("mpi_max_message_bytes = 2147483647") != std::string::npos);
  }
  const auto check = test::run_tool("config check " + c.config.string());
  CHECK(check.exit_code == 0);
  CHECK(check.output.find("ok (2 ranks, 4 experts") != std::string::npos);
  const auto bad = test::run_tool("config check " + c.config.string() + " --set router.top_k=0");
  CHECK(bad.exit_code == 1);
}

TEST_CASE("plugins lists the built plugins") {
  const auto result = test::run_tool("plugins");
  INFO(result.output);
  CHECK(result.exit_code == 0);
  for (const char* name : {"inproc", "topk", "cpu_swiglu"})
    CHECK(result.output.find(name) != std::string::npos);
  const auto with_fixtures = test::run_tool("plugins --dir " SWITCHYARD_FIXTURE_PLUGIN_DIR);
  CHECK(with_fixtures.output.find("rejected:") != std::string::npos);
  CHECK(with_fixtures.output.find("libswitchyard-router-wrongabi.so") != std::string::npos);
}

TEST_CASE("route: a [router]-only config on logits from a file, checked by hand") {
  test::TempDir dir;
  // The public 4x4 example; softmax, pre_softmax, top-2.
  const double z[4][4] = {
      {.11, .2, .1, .3}, {.3, .4, .11, .1}, {.11, .1, .6, .5}, {.1, .11, .7, .8}};
  HostTensor logits(DType::kF32, {4, 4});
  for (int t = 0; t < 4; ++t)
    for (int e = 0; e < 4; ++e) logits.data<float>()[t * 4 + e] = static_cast<float>(z[t][e]);
  write_npy(dir / "l.npy", logits.view());
  test::write_text(dir / "r.toml", "[router]\ntop_k = 2\nbias_update_rate = 0.1\n");
  const auto r = test::run_tool("route " + (dir / "r.toml").string() + " --logits " +
                                (dir / "l.npy").string() + " --out " + (dir / "out").string());
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  const HostTensor experts = read_npy(dir / "out" / "experts.npy");
  const std::vector<std::int32_t> expected = {3, 1, 1, 0, 2, 3, 3, 2};
  REQUIRE(experts.numel() == 8);
  CHECK(std::vector<std::int32_t>(experts.data<std::int32_t>(), experts.data<std::int32_t>() + 8) ==
        expected);
  const HostTensor counts = read_npy(dir / "out" / "counts.npy");
  CHECK(std::vector<std::int64_t>(counts.data<std::int64_t>(), counts.data<std::int64_t>() + 4) ==
        std::vector<std::int64_t>{1, 2, 2, 3});
  // One update from these counts (mean 2): +γ below the mean, −γ above it.
  const HostTensor bias = read_npy(dir / "out" / "bias.npy");
  CHECK(std::vector<float>(bias.data<float>(), bias.data<float>() + 4) ==
        std::vector<float>{0.1f, 0.0f, 0.0f, -0.1f});
  // The losses in double from their definitions.
  double p_sum[4] = {}, z_loss = 0;
  for (const auto& row : z) {
    double m = row[0], s = 0;
    for (double v : row) m = std::max(m, v);
    for (double v : row) s += std::exp(v - m);
    for (int e = 0; e < 4; ++e) p_sum[e] += std::exp(row[e] - m) / s;
    z_loss += (m + std::log(s)) * (m + std::log(s));
  }
  const double plain_counts[4] = {1, 2, 2, 3};
  double aux = 0;
  for (int e = 0; e < 4; ++e) aux += p_sum[e] * plain_counts[e];
  aux *= 4.0 / (2 * 16);
  z_loss /= 4;
  std::ifstream in(dir / "out" / "stats.json");
  const std::string json((std::istreambuf_iterator<char>(in)), {});
  auto field = [&](const std::string& name) {
    return std::stod(json.substr(json.find("\"" + name + "\": ") + name.size() + 4));
  };
  CHECK(field("aux_loss") == doctest::Approx(aux).epsilon(1e-6));
  CHECK(field("z_loss") == doctest::Approx(z_loss).epsilon(1e-6));
  CHECK(field("imbalance") == doctest::Approx(1.5));
  CHECK(json.find("\"counts\": [1, 2, 2, 3]") != std::string::npos);

  const auto wrong = test::run_tool("route " + (dir / "r.toml").string() + " --logits " +
                                    (dir / "l.npy").string() + " --out " + (dir / "out").string() +
                                    " --set router.num_experts=5");
  CHECK(wrong.exit_code == 1);
  CHECK(wrong.output.find("router.num_experts: is 5 but") != std::string::npos);
}

TEST_CASE("bench: every figure, and the bytes of a routing counted by hand") {
  // 4 experts on 2 ranks, every token to all 4 (top_k = 4): each token goes to the other
  // rank once in the runtime (one f32 row of 16 = 64 bytes, 4 slots of 8 bytes) and twice
  // in the naive dispatcher (one row and one (expert, weight) of 8 bytes per pair). The
  // runtime also sends its counts (24 bytes); the raw exchange moves the rows alone.
  Case c;
  c.write_config("", "top_k = 4\n");
  const auto json = c.dir / "bench.json";
  const auto result = test::run_tool("bench " + c.config.string() +
                                     " --routing uniform --tokens-per-rank 64 --iters 3 "
                                     "--warmup 1 --json " +
                                     json.string());
  INFO(result.output);
  REQUIRE(result.exit_code == 0);
  CHECK(result.output.find("dispatch + combine") != std::string::npos);
  std::ifstream file(json);
  const std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  auto value = [&](const std::string& key) {
    const auto at = text.find("\"" + key + "\":");
    REQUIRE_MESSAGE(at != std::string::npos, key);
    return std::stod(text.substr(at + key.size() + 3));
  };
  // + the counts: the row count and the slots for each of the peer's 2 experts, 8 bytes each
  CHECK(value("bytes_dispatch") == 64 * (64 + 4 * 8) + 3 * 8);
  CHECK(value("bytes_raw_dispatch") == 64 * (64 + 4 * 8));
  CHECK(value("bytes_naive_dispatch") == 64 * 2 * (64 + 8));
  CHECK(value("allocations_per_step") == 0);
  CHECK(value("tokens_per_rank") == 64);
  CHECK(value("world") == 2);
  for (const char* key :
       {"dispatch_combine_s", "raw_alltoallv_s", "naive_dispatch_combine_s", "route_s",
        "layer_forward_s", "expert_s", "memcpy_bytes_per_s", "peak_buffer_bytes"}) {
    CAPTURE(key);
    CHECK(value(key) > 0);
  }
}

namespace {

/// Writes a simulate config: `simulate` lines under [simulate], `model` under [model].
std::filesystem::path simulate_config(const test::TempDir& dir, const std::string& simulate,
                                      const std::string& model = "num_experts = 2\nhidden = 16\n",
                                      const std::string& router = "top_k = 1\n") {
  const auto path = dir / "sim.toml";
  test::write_text(path, "[model]\n" + model + "\n[router]\n" + router + "\n[simulate]\n" +
                             simulate + "\n[runtime]\npayload_dtype = \"f32\"\n");
  return path;
}

nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream file(path);
  return nlohmann::json::parse(file);
}

}  // namespace

TEST_CASE("simulate: a routing counted by hand, in the table, the JSON and the HTML") {
  // One node of 2 GPUs, 2 experts (one per rank), top-1 on 4 recorded tokens: rank 0 gets
  // tokens 0-1 (to experts 0 and 1), rank 1 tokens 2-3 (both to expert 1). One copy moves:
  // rank 0 -> rank 1, a 16-float row (64 bytes) plus its (expert, weight) slot (8 bytes),
  // inside the node: 72 bytes at the h800 preset's 155 GB/s plus its 3 us.
  test::TempDir dir;
  std::vector<float> logits = {1, 0, 0, 1, 0, 1, 0, 1};
  write_npy(dir / "logits.npy", TensorView(logits.data(), DType::kF32, {4, 2}));
  const auto config = simulate_config(dir,
                                      "nodes = 1\ngpus_per_node = 2\nlogits = \"logits.npy\"\n"
                                      "steps = 2\n");
  const auto result =
      test::run_tool("simulate " + config.string() + " --json " + (dir / "s.json").string() +
                     " --html " + (dir / "s.html").string());
  INFO(result.output);
  REQUIRE(result.exit_code == 0);
  CHECK(result.output.find("1 nodes × 2 GPUs (EP groups of 2), 2 experts") != std::string::npos);
  CHECK(result.output.find("policy=topk,top_k=1") != std::string::npos);
  const nlohmann::json j = read_json(dir / "s.json");
  CHECK(j["cluster"]["world"] == 2);
  CHECK(j["steps"] == 2);
  const auto& total = j["settings"][0]["total"];
  CHECK(total["tokens"] == 8);  // the recorded tokens every step
  CHECK(total["tokens_per_expert"] == nlohmann::json::array({2, 6}));
  CHECK(total["imbalance"].get<double>() == doctest::Approx(1.5));
  CHECK(total["nodes_per_token"].get<double>() == doctest::Approx(1.0));
  const auto& per_rank = total["accountings"][1];
  CHECK(per_rank["name"] == "per rank");
  CHECK(per_rank["copies"] == 2);
  CHECK(per_rank["intra_node_bytes"] == 2 * 72);
  CHECK(per_rank["inter_node_bytes"] == 0);
  CHECK(total["dispatch_bytes"]["per rank"]["rank"] == nlohmann::json::array({0, 144, 0, 0}));
  CHECK(total["dispatch_bytes"]["per rank"]["node"] == nlohmann::json::array({144}));
  CHECK(total["dispatch_bytes"]["per expert"]["rank"] == nlohmann::json::array({0, 144, 0, 0}));
  // Per resource, over both steps: rank 0 sends 144 bytes inside the node, rank 1 takes them.
  const auto& resources = total["resource_seconds"]["per rank"]["dispatch"];
  CHECK(resources[0]["intra_send_s"].get<double>() == doctest::Approx(144 / 155e9 + 3e-6));
  CHECK(resources[1]["intra_receive_s"].get<double>() == doctest::Approx(144 / 155e9 + 3e-6));
  CHECK(resources[0]["nic_send_s"].get<double>() == 0);
  CHECK(resources[1]["intra_send_s"].get<double>() == 0);
  const auto& step = j["settings"][0]["steps"][0];
  CHECK(step["accountings"][1]["dispatch_s"].get<double>() == doctest::Approx(72 / 155e9 + 3e-6));
  // Rank 0 sends what rank 1 receives: the tie names the lower rank.
  CHECK(step["accountings"][1]["dispatch_bottleneck"] == "intra-node send of rank 0 (node 0)");
  CHECK(step["heatmap"]["bytes"] == nlohmann::json::array({0, 72, 0, 0}));
  std::ifstream html(dir / "s.html");
  const std::string page((std::istreambuf_iterator<char>(html)), std::istreambuf_iterator<char>());
  CHECK(page.find("<svg id=\"routing\"") != std::string::npos);
  CHECK(page.find("\"tokens_per_expert\":[1,3]") != std::string::npos);
  CHECK(page.find("/*SIMULATION_DATA*/null") == std::string::npos);
  CHECK(page.find("http") == page.find("http://www.w3.org/2000/svg"));  // no other link
}

TEST_CASE("simulate --compare: one row per setting, over the same logits") {
  test::TempDir dir;
  const auto config = simulate_config(dir, "nodes = 4\ngpus_per_node = 2\ntokens_per_rank = 64\n",
                                      "num_experts = 16\nhidden = 32\n", "top_k = 4\n");
  const auto result = test::run_tool("simulate " + config.string() +
                                     " --compare policy=topk policy=node_limited,max_groups=2 "
                                     "--json " +
                                     (dir / "c.json").string());
  INFO(result.output);
  REQUIRE(result.exit_code == 0);
  CHECK(result.output.find("policy=node_limited,max_groups=2") != std::string::npos);
  const nlohmann::json j = read_json(dir / "c.json");
  REQUIRE(j["settings"].size() == 2);
  CHECK(j["settings"][0]["total"]["tokens"] == 8 * 64);
  CHECK(j["settings"][1]["total"]["max_nodes_per_token"].get<int>() <= 2);
  CHECK(j["settings"][0]["total"]["max_nodes_per_token"].get<int>() > 2);
}

TEST_CASE("simulate: bad input is refused before any work, naming what to fix") {
  test::TempDir dir;
  struct Bad {
    std::string simulate, model, extra_args, message;
  };
  std::vector<float> logits(6 * 3, 0.5f);
  write_npy(dir / "three.npy", TensorView(logits.data(), DType::kF32, {6, 3}));
  for (const Bad& bad : {
           Bad{"nodes = 2\ngpus_per_node = 8\nep_size = 3\n", "", "",
               "ep_size 3 does not divide the 16 ranks (2 nodes × 8 GPUs)"},
           Bad{"preset = \"h900\"\n", "", "",
               "simulate.preset: unknown link preset 'h900' (presets: h800, h100, b200, cpu)"},
           Bad{"logits = \"three.npy\"\n", "num_experts = 4\n", "", "model.num_experts: is 4 but"},
           Bad{"logits = \"zipf\"\n", "", "", "expected normal, zipf:S"},
           Bad{"nodes = 2\n", "num_experts = 4\n", "--compare top_k",
               "--compare 'top_k': expected key=value,key=value"},
           Bad{"nodes = 2\n", "num_experts = 4\n", "--compare policy=node_limited,max_groups=3",
               "router setting 'policy=node_limited,max_groups=3'"},
           Bad{"nodes = 2\n", "num_experts = 4\n", "--set router.num_experts=5",
               "router.num_experts: is 5 but the logits have 4 experts"},
       }) {
    CAPTURE(bad.message);
    const auto config =
        simulate_config(dir, bad.simulate, bad.model.empty() ? "num_experts = 8\n" : bad.model);
    const auto result = test::run_tool("simulate " + config.string() + " " + bad.extra_args +
                                       " --json " + (dir / "never.json").string());
    INFO(result.output);
    CHECK(result.exit_code == 1);
    CHECK(result.output.find(bad.message) != std::string::npos);
    CHECK(result.output.find("step 1") == std::string::npos);
    CHECK_FALSE(std::filesystem::exists(dir / "never.json"));
  }
}

TEST_CASE("plan-experts: the published EPLB example through the tool, and bad loads refused") {
  // DeepSeek's EPLB README example (also vLLM's test_basic_rebalance): 2 layers of 12
  // experts in 4 groups, 8 ranks on 2 nodes, 4 redundant copies.
  test::TempDir dir;
  const std::int64_t load[24] = {90, 132, 40,  61, 104, 165, 39,  4,   73,  56, 183, 86,
                                 20, 107, 104, 64, 19,  197, 187, 157, 172, 86, 16,  27};
  write_npy(dir / "load.npy", TensorView(const_cast<std::int64_t*>(load), DType::kI64, {2, 12}));
  test::write_text(dir / "plan.toml",
                   "[runtime]\nranks = 8\nranks_per_node = 4\n[router]\npolicy = "
                   "\"node_limited\"\nnum_groups = 4\nmax_groups = 2\ntop_k = 2\n");
  const std::string plan = "plan-experts " + (dir / "plan.toml").string() + " --load " +
                           (dir / "load.npy").string() + " --out " + (dir / "out").string();
  const auto r = test::run_tool(plan + " --redundant 4 --published");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  const HostTensor slots = read_npy(dir / "out" / "expert_of_slot.npy");
  REQUIRE(slots.shape() == std::vector<std::int64_t>{2, 16});
  CHECK(std::vector<std::int32_t>(slots.data<std::int32_t>(), slots.data<std::int32_t>() + 32) ==
        std::vector<std::int32_t>{5, 6,  5, 7, 8, 4,  3, 4, 10, 9, 10, 2, 0, 1, 11, 1,
                                  7, 10, 6, 8, 6, 11, 8, 9, 2,  4, 5,  1, 5, 0, 3,  1});
  // Layer 0 by hand: the contiguous placement gives rank 0 experts 0 and 1 (90 + 132).
  // The planned loads keep the total (1033) and are at least as even as the published
  // slots with each expert split evenly over its copies (worked out here from them).
  std::ifstream in(dir / "out" / "plan.json");
  const nlohmann::json json = nlohmann::json::parse(in);
  const auto& layer0 = json["layers"][0];
  CHECK(layer0["rank_load_contiguous"][0].get<double>() == 222);
  double total = 0, most = 0;
  for (const auto& l : layer0["rank_load_planned"]) {
    total += l.get<double>();
    most = std::max(most, l.get<double>());
  }
  CHECK(total == doctest::Approx(1033));
  CHECK(layer0["imbalance_planned"].get<double>() == doctest::Approx(most * 8 / 1033));
  const int published[16] = {5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1};
  const int copies[12] = {1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1};
  double even_most = 0;
  for (int rank = 0; rank < 8; ++rank) {
    const int a = published[2 * rank], b = published[2 * rank + 1];
    even_most = std::max(even_most, static_cast<double>(load[a]) / copies[a] +
                                        static_cast<double>(load[b]) / copies[b]);
  }
  CHECK(even_most * 8 / 1033 == doctest::Approx(1.2081).epsilon(1e-4));
  CHECK(layer0["imbalance_planned"].get<double>() <= even_most * 8 / 1033 + 1e-9);
  CHECK(r.output.find("imbalance 2.083 contiguous") != std::string::npos);
  // The shares give those planned loads: each slot's share of its expert's load, by rank.
  const HostTensor shares = read_npy(dir / "out" / "share_of_slot.npy");
  REQUIRE(shares.shape() == std::vector<std::int64_t>{2, 16});
  for (int rank = 0; rank < 8; ++rank) {
    double carried = 0;
    for (int s = 2 * rank; s < 2 * rank + 2; ++s)
      carried += static_cast<double>(load[published[s]]) * shares.data<double>()[s];
    CHECK(carried == doctest::Approx(layer0["rank_load_planned"][rank].get<double>()));
  }
  // Refined (the default): the same copies, and no layer more unbalanced than published.
  const auto refined = test::run_tool("plan-experts " + (dir / "plan.toml").string() + " --load " +
                                      (dir / "load.npy").string() + " --out " +
                                      (dir / "refined").string() + " --redundant 4");
  REQUIRE(refined.exit_code == 0);
  std::ifstream refined_in(dir / "refined" / "plan.json");
  const nlohmann::json refined_json = nlohmann::json::parse(refined_in);
  const HostTensor refined_copies = read_npy(dir / "refined" / "copies.npy");
  const HostTensor published_copies = read_npy(dir / "out" / "copies.npy");
  CHECK(std::equal(refined_copies.data<std::int32_t>(), refined_copies.data<std::int32_t>() + 24,
                   published_copies.data<std::int32_t>()));
  for (int l = 0; l < 2; ++l) {
    CHECK(refined_json["layers"][l]["imbalance_planned"].get<double>() <=
          json["layers"][l]["imbalance_planned"].get<double>() + 1e-9);
  }
  // A load that is not [E] or [layers, E], and a negative one.
  const float cube[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  write_npy(dir / "cube.npy", TensorView(const_cast<float*>(cube), DType::kF32, {2, 2, 2}));
  const auto bad = test::run_tool("plan-experts " + (dir / "plan.toml").string() + " --load " +
                                  (dir / "cube.npy").string() + " --out " + (dir / "o2").string());
  CHECK(bad.exit_code == 1);
  CHECK(bad.output.find("must hold [E] or [layers, E] loads") != std::string::npos);
  const float negative[4] = {1, -2, 3, 4};
  write_npy(dir / "neg.npy", TensorView(const_cast<float*>(negative), DType::kF32, {4}));
  const auto neg = test::run_tool("plan-experts " + (dir / "plan.toml").string() + " --load " +
                                  (dir / "neg.npy").string() + " --out " + (dir / "o3").string());
  CHECK(neg.exit_code == 1);
  CHECK(neg.output.find("expert 1's load is -2") != std::string::npos);
  CHECK(test::run_tool(plan + " --redundant -1").exit_code == 2);
}

#include <doctest/doctest.h>

#include <cstdlib>

#include "switchyard/config.hpp"
#include "switchyard/status.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

ConfigSchema router_schema() {
  ConfigSchema s;
  s.add("top_k", ConfigType::kInt, ConfigValue{std::int64_t{2}}, "experts per token",
        checks::int_range(1, 8));
  s.add("score", ConfigType::kString, ConfigValue{std::string("softmax")}, "score",
        checks::one_of({"softmax", "sigmoid"}));
  s.add("scale", ConfigType::kFloat, ConfigValue{1.0}, "scale");
  s.add("normalize", ConfigType::kBool, std::nullopt, "optional");
  s.add("dirs", ConfigType::kStringList, ConfigValue{std::vector<std::string>{}}, "list");
  return s;
}

}  // namespace

TEST_CASE("values, defaults and origins") {
  Config c = Config::from_string("[router]\ntop_k = 4\nscale = 2\n", "moe.toml");
  ConfigSection s = c.section("router", router_schema());
  CHECK(s.get_int("top_k") == 4);
  CHECK(s.origin("top_k").describe() == "moe.toml:2:9");
  CHECK(s.get_float("scale") == 2.0);  // an integer is accepted for a float
  CHECK(s.get_string("score") == "softmax");
  CHECK(s.origin("score").describe() == "default");
  CHECK_FALSE(s.has("normalize"));
}

TEST_CASE("precedence: default < file < environment < command line and API") {
  Config c =
      Config::from_string("[router]\ntop_k = 4\nscore = \"sigmoid\"\nscale = 3.0\n", "moe.toml");
  setenv("SWITCHYARD_ROUTER_TOP_K", "5", 1);
  setenv("SWITCHYARD_ROUTER_SCALE", "0.5", 1);
  setenv("SWITCHYARD_PLUGIN_PATH", "/not/a/config/key", 1);  // not a section: ignored
  const std::string_view sections[] = {"router"};
  c.set_from_command_line("router.top_k=6");
  c.apply_environment(sections);  // applied after --set, still loses to it
  unsetenv("SWITCHYARD_ROUTER_TOP_K");
  unsetenv("SWITCHYARD_ROUTER_SCALE");
  unsetenv("SWITCHYARD_PLUGIN_PATH");
  ConfigSection s = c.section("router", router_schema());
  CHECK(s.get_int("top_k") == 6);
  CHECK(s.origin("top_k").describe() == "--set router.top_k=6");
  CHECK(s.get_float("scale") == 0.5);
  CHECK(s.origin("scale").describe() == "environment SWITCHYARD_ROUTER_SCALE");
  CHECK(s.get_string("score") == "sigmoid");
  c.set("router", "top_k", std::int64_t{7});
  CHECK(c.section("router", router_schema()).get_int("top_k") == 7);
}

TEST_CASE("errors carry the position and what to fix") {
  CHECK(test::error_message([] {
          Config::from_string("[router\ntop_k = 1", "bad.toml");
        }).rfind("bad.toml:1:", 0) == 0);
  CHECK(
      test::error_message([] {
        Config::from_string("[router]\ntop_k = 0\n", "moe.toml").section("router", router_schema());
      }) == "moe.toml:2:9: router.top_k: must be in 1..8 (got 0)");
  CHECK(
      test::error_message([] {
        Config::from_string("[router]\ntopk = 2\n", "moe.toml").section("router", router_schema());
      }).rfind("moe.toml:2:8: router.topk: unknown key (did you mean 'top_k'?)", 0) == 0);
  CHECK(test::error_message([] {
          Config::from_string("[router]\ntop_k = \"two\"\n", "moe.toml")
              .section("router", router_schema());
        }) == "moe.toml:2:9: router.top_k: wrong type: expected integer, got string \"two\"");
  CHECK(test::error_message([] {
          Config::from_string("[router]\nscore = \"sigmod\"\n", "m.toml")
              .section("router", router_schema());
        }) ==
        "m.toml:2:9: router.score: must be one of \"softmax\", \"sigmoid\" (got \"sigmod\"); did "
        "you mean \"sigmoid\"?");
  CHECK(test::error_message([] {
          Config::from_string("top = 1\n", "m.toml");
        }).rfind("m.toml:1:7: top: top-level keys are not allowed", 0) == 0);
  CHECK(test::error_message([] {
          Config c;
          c.set_from_command_line("router.top_k=abc");
          c.section("router", router_schema());
        }) == "--set router.top_k=abc: router.top_k: expected integer (got \"abc\")");
  CHECK(test::error_message([] {
          Config().set_from_command_line("top_k=2");
        }).find("expected section.key=value") != std::string::npos);
  const std::string_view known[] = {"runtime", "router"};
  CHECK(test::error_message([] {
          const std::string_view k[] = {"runtime", "router"};
          Config::from_string("[ruter]\ntop_k = 1\n", "m.toml").check_sections(k);
        }).rfind("m.toml:1:1: [ruter]: unknown section (did you mean [router]?)", 0) == 0);
  // An empty section is a typo as much as a full one.
  CHECK(test::error_message([] {
          const std::string_view k[] = {"runtime", "router"};
          Config::from_string("[runtime]\n[rnutime]\n", "e.toml").check_sections(k);
        }).rfind("e.toml:2:1: [rnutime]: unknown section (did you mean [runtime]?)", 0) == 0);
  (void)known;
}

TEST_CASE("non-ASCII text: an error outside strings, kept as it is inside strings") {
  // U+00FA in a bare key, and U+02DF after a value, drove toml++ 3.3 into an unreachable
  // branch (found by fuzzing): now plain parse errors that quote the character.
  const std::string in_key =
      test::error_message([] { Config::from_string("[runtime]\nra\xc3\xba = 1\n", "u.toml"); });
  CHECK(in_key.rfind("u.toml:2:", 0) == 0);
  CHECK(in_key.find("malformed TOML") != std::string::npos);
  CHECK(in_key.find("\xc3\xba") != std::string::npos);
  CHECK(test::error_message([] {
          Config::from_string("[runtime]\nranks = 2x\xcb\x9f\n", "v.toml");
        }).find("v.toml:2:") == 0);
  CHECK(test::error_message([] {
          Config::from_string("[model]\nprefix = \"\xee\x80\x81\"\n", "p.toml");
        }) == "p.toml:2:11: a private-use character (U+E001) is not accepted in a configuration");
  // In strings (all four kinds) and comments it is text like any other.
  const Config c = Config::from_string(
      "# caf\xc3\xa9 \xe3\x80\x80\n[model]\nweights = \"caf\xc3\xa9 \\\" \xc3\xa9\" # "
      "d\xc3\xa9j\xc3\xa0\n"
      "prefix = '\xc3\xa9'\n[input]\ntokens = \"\"\"\n\xc3\xa9\"\"\"\n[output]\npath = "
      "\'\'\'\xc3\xa9\n\'\'\'\n",
      "ok.toml");
  ConfigSchema model;
  model.add("weights", ConfigType::kString, std::nullopt, "w");
  model.add("prefix", ConfigType::kString, std::nullopt, "p");
  CHECK(c.section("model", model).get_string("weights") == "caf\xc3\xa9 \" \xc3\xa9");
  CHECK(c.section("model", model).get_string("prefix") == "\xc3\xa9");
  // Every shielded character comes back as itself, at both ends of both ranges.
  const Config edges = Config::from_string(
      "[model]\nweights = \"\xc2\xa1\xd2\x99\xe2\xb1\x9e\xe3\x81\x97\xe3\x80\x80\xef\xac\xa6"
      "\xef\xbb\xbe\"\n",
      "e.toml");
  CHECK(edges.section("model", model).get_string("weights") ==
        "\xc2\xa1\xd2\x99\xe2\xb1\x9e\xe3\x81\x97\xe3\x80\x80\xef\xac\xa6\xef\xbb\xbe");
}

TEST_CASE("a seconds check takes finite positive values up to its bound") {
  ConfigSchema s;
  s.add("timeout_s", ConfigType::kFloat, ConfigValue{300.0}, "t",
        checks::seconds_up_to(kMaxTimeoutSeconds));
  auto timeout = [&](const std::string& text) {
    return test::error_message([&] {
      Config c;
      c.set_from_command_line("runtime.timeout_s=" + text);
      c.section("runtime", s);
    });
  };
  CHECK(timeout("604800") == "no error");
  CHECK(timeout("0.001") == "no error");
  for (const char* bad : {"1e10", "604800.5", "0", "-1", "nan", "inf"}) {
    CAPTURE(bad);
    CHECK(timeout(bad).find("runtime.timeout_s: must be a number of seconds in (0, 604800 s] "
                            "(got ") != std::string::npos);
  }
}

TEST_CASE("text values are parsed by the schema's type") {
  Config c;
  c.set_from_command_line("router.normalize=true");
  c.set_from_command_line("router.dirs=a,b");
  c.set_from_command_line("router.scale=1e-3");
  ConfigSection s = c.section("router", router_schema());
  CHECK(s.get_bool("normalize"));
  CHECK(s.get_string_list("dirs") == std::vector<std::string>{"a", "b"});
  CHECK(s.get_float("scale") == doctest::Approx(1e-3));
}

TEST_CASE("paths from a file are relative to the file") {
  test::TempDir dir;
  test::write_text(dir / "moe.toml",
                   "[router]\nscore = \"softmax\"\n[model]\nweights = \"w.safetensors\"\n");
  Config c = Config::from_file(dir / "moe.toml");
  ConfigSchema model;
  model.add("weights", ConfigType::kString, std::nullopt, "weights");
  CHECK(c.section("model", model).get_path("weights") == dir.path() / "w.safetensors");
  c.set_from_command_line("model.weights=x.safetensors");
  CHECK(c.section("model", model).get_path("weights") == std::filesystem::path("x.safetensors"));
  CHECK_THROWS_AS(Config::from_file(dir / "missing.toml"), Error);
}

TEST_CASE("did_you_mean only suggests close words") {
  const std::vector<std::string> words = {"top_k", "score", "normalize"};
  CHECK(did_you_mean("topk", words) == "top_k");
  CHECK(did_you_mean("normalise", words) == "normalize");
  CHECK(did_you_mean("completely_different", words).empty());
}

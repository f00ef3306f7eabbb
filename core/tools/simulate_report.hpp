#pragma once
// The HTML report of `switchyard simulate`: one self-contained file (inline CSS, script and
// SVG/canvas drawing; no network) around the simulation's JSON.

#include <string>

namespace switchyard::tool {

/// The report page with `simulation_json` (what --json writes) embedded.
std::string render_simulation_report(const std::string& simulation_json);

}  // namespace switchyard::tool

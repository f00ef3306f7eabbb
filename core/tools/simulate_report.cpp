#include "simulate_report.hpp"

#include "switchyard/status.hpp"

namespace switchyard::tool {

// simulate_report.html as a string, generated at configure time (simulate_report_html.cpp).
extern const char* const kSimulationReportTemplate;

std::string render_simulation_report(const std::string& simulation_json) {
  std::string page(kSimulationReportTemplate);
  const std::string marker = "/*SIMULATION_DATA*/null";
  const std::size_t at = page.find(marker);
  if (at == std::string::npos) {
    throw Error(ErrorCode::kInternal, "the report template has no data marker");
  }
  // Inside <script>, "</" could end the element early: JSON allows "<\/" for it.
  std::string data;
  data.reserve(simulation_json.size());
  for (std::size_t i = 0; i < simulation_json.size(); ++i) {
    data += simulation_json[i];
    if (simulation_json[i] == '<' && i + 1 < simulation_json.size() &&
        simulation_json[i + 1] == '/') {
      data += '\\';
    }
  }
  page.replace(at, marker.size(), data);
  return page;
}

}  // namespace switchyard::tool

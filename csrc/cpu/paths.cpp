// The choice table (paths.h) and its text form, one line per signature: "<kind> <key ints...> <choice>".
#include "paths.h"

#include <torch/library.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <string>

namespace spafl::cpu {
namespace {

std::mutex& table_mutex() {
  static std::mutex mutex;
  return mutex;
}

std::map<ChoiceKey, int64_t>& table() {
  static std::map<ChoiceKey, int64_t> choices;
  return choices;
}

int64_t setting(const char* name, const char* values[2], const char* hint) {
  const char* value = std::getenv(name);
  if (value == nullptr || value[0] == '\0' || std::string(value) == "auto") return -1;
  for (int64_t i = 0; i < 2; ++i) {
    if (std::string(value) == values[i]) return i;
  }
  TORCH_CHECK(false, name, "='", value, "' is not a setting: use ", hint);
}

std::string paths_export() {
  const std::lock_guard<std::mutex> lock(table_mutex());
  std::ostringstream out;
  for (const auto& [key, choice] : table()) {
    for (const int64_t k : key) out << k << ' ';
    out << choice << '\n';
  }
  return out.str();
}

// Adds the lines of `text` (paths_export's form) to the table; a signature already there keeps its choice.
void paths_import(const std::string& text) {
  std::istringstream lines(text);
  std::string line;
  std::map<ChoiceKey, int64_t> parsed;
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    ChoiceKey key;
    int64_t v;
    while (fields >> v) key.push_back(v);
    TORCH_CHECK(fields.eof(), "spafl::paths_import: not a line of integers: '", line, "'");
    if (key.empty()) continue;
    TORCH_CHECK(key.size() >= 2 && key[0] >= kLinearFwd && key[0] <= kConvDw && (key.back() == 0 || key.back() == 1),
                "spafl::paths_import: not a choice line: '", line, "'");
    const int64_t choice = key.back();
    key.pop_back();
    parsed.emplace(std::move(key), choice);
  }
  const std::lock_guard<std::mutex> lock(table_mutex());
  for (auto& [key, choice] : parsed) table().emplace(key, choice);
}

void paths_clear() {
  const std::lock_guard<std::mutex> lock(table_mutex());
  table().clear();
}

}  // namespace

std::optional<int64_t> find_choice(const ChoiceKey& key) {
  const std::lock_guard<std::mutex> lock(table_mutex());
  const auto found = table().find(key);
  if (found == table().end()) return std::nullopt;
  return found->second;
}

int64_t record_choice(const ChoiceKey& key, int64_t choice) {
  const std::lock_guard<std::mutex> lock(table_mutex());
  return table().emplace(key, choice).first->second;
}

int64_t pinned_path() {
  static const char* values[2] = {"skip", "dense"};
  return setting("SPAFL_CPU_PATH", values, "skip, dense or auto");
}

int64_t forced_timing() {
  static const char* values[2] = {"first", "second"};
  return setting("SPAFL_CPU_TIMED_CHOICE", values, "first, second or auto");
}

}  // namespace spafl::cpu

TORCH_LIBRARY_FRAGMENT(spafl, m) {
  m.def("paths_export() -> str", &spafl::cpu::paths_export);
  m.def("paths_import(str text) -> ()", &spafl::cpu::paths_import);
  m.def("paths_clear() -> ()", &spafl::cpu::paths_clear);
}

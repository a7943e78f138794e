// Call counters and the debug call log; one line per call, separate FWD / BWD counters.
#include "core/call_log.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <sstream>

namespace orchard {
namespace {

struct LogState {
    std::mutex mutex;
    Stats stats;
    std::FILE* file = nullptr;
    std::string file_path;
};

LogState& state() {
    static LogState s;
    return s;
}

bool log_enabled() {
    const char* v = std::getenv("ORCHARD_DEBUG_FLASH_ATN");
    return v != nullptr && v[0] != '\0' && std::string(v) != "0";
}

std::string window_str(int64_t w) { return w >= kUnbounded ? "-1" : std::to_string(w); }

std::string describe(Direction dir, const PreparedCall& call, int64_t n, const std::string& note) {
    const AttentionParams& p = call.params;
    std::ostringstream os;
    os << (dir == Direction::forward ? "FWD" : "BWD") << " call=" << n
       << " backend=" << to_string(p.backend) << " op=" << call.op << " B=" << p.B
       << " Sq=" << p.Sq << " Sk=" << p.Sk << " Hq=" << p.Hq << " Hkv=" << p.Hkv << " D=" << p.D
       << " Dv=" << p.Dv << " dtype=" << to_string(p.dtype)
       << " device=" << to_string(p.device.kind) << ":" << p.device.index
       << " varlen=" << p.is_varlen() << " window=(" << window_str(p.window_left) << ","
       << window_str(p.window_right) << ") scale=" << p.scale << " softcap=" << p.softcap
       << " alibi=" << (p.alibi_slopes != nullptr) << " dropout=" << p.dropout_p;
    if (p.q_position_offset != 0 || p.k_position_offset != 0)
        os << " positions=(" << p.q_position_offset << "," << p.k_position_offset << ")";
    os << " deterministic=" << p.deterministic << " " << (note.empty() ? "fallback=none" : note);
    return os.str();
}

// The per-direction call number of the call just counted (fallbacks included).
int64_t call_number(const Stats& stats, int d) {
    int64_t total = stats.fallbacks[d];
    for (int64_t c : stats.calls[d]) total += c;
    return total;
}

// Appends one line to the log file, when the log is on. Caller holds the mutex.
void write_line(LogState& s, const std::string& line) {
    const std::string path = log_file_path();
    if (s.file == nullptr || path != s.file_path) {
        if (s.file != nullptr) std::fclose(s.file);
        s.file = std::fopen(path.c_str(), "a");
        s.file_path = path;
        if (s.file == nullptr) return;  // the log is best-effort; the call itself goes on
    }
    std::fprintf(s.file, "%s\n", line.c_str());
    std::fflush(s.file);
}

}  // namespace

std::string log_file_path() {
    const char* f = std::getenv("ORCHARD_LOG_FILE");
    if (f != nullptr && f[0] != '\0') return f;
    return (std::filesystem::temp_directory_path() / "orchard_calls.log").string();
}

void log_call(Direction dir, const PreparedCall& call, const std::string& note) {
    LogState& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    const int d = int(dir);
    ++s.stats.calls[d][int(call.params.backend)];
    if (note.find("staging") != std::string::npos) ++s.stats.staging_copies[d];
    if (log_enabled()) write_line(s, describe(dir, call, call_number(s.stats, d), note));
}

void record_fallback(Direction dir, const std::string& op, const std::string& used,
                     const std::string& reason) {
    LogState& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    const int d = int(dir);
    ++s.stats.fallbacks[d];
    if (!log_enabled()) return;
    std::ostringstream os;
    os << (dir == Direction::forward ? "FWD" : "BWD") << " call=" << call_number(s.stats, d)
       << " backend=" << used << " op=" << op << " fallback=" << reason;
    write_line(s, os.str());
}

void record_staging_copy(Direction dir, const std::string& op, const std::string& what) {
    LogState& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    const int d = int(dir);
    ++s.stats.staging_copies[d];
    if (!log_enabled()) return;
    std::ostringstream os;
    os << (dir == Direction::forward ? "FWD" : "BWD") << " staging op=" << op << " copied " << what;
    write_line(s, os.str());
}

Stats stats() {
    std::lock_guard<std::mutex> lock(state().mutex);
    return state().stats;
}

void reset_stats() {
    std::lock_guard<std::mutex> lock(state().mutex);
    state().stats = Stats{};
}

}  // namespace orchard

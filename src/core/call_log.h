// Call counters and the debug call log (ORCHARD_DEBUG_FLASH_ATN=1, file ORCHARD_LOG_FILE).
#pragma once

#include <string>

#include "core/validate.h"

namespace orchard {

// Counts the call and, when the log is on, appends one line describing it. `note` carries any
// fallback or staging copy and its reason (empty when none). Thread-safe.
void log_call(Direction dir, const PreparedCall& call, const std::string& note = {});

// The log file in use: ORCHARD_LOG_FILE, or orchard_calls.log in the system temp dir.
std::string log_file_path();

}  // namespace orchard

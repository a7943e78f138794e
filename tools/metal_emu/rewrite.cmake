# The emulator's mechanical rewrite of a .metal / MSL header into C++ (cmake -P, IN= OUT=):
#  - `device T*` and `threadgroup T*` (optionally const) become orchard_emu::checked_ptr<T>,
#    so every buffer and threadgroup-memory access is bounds-checked;
#  - a threadgroup array declared in a kernel, `threadgroup T name[N];`, becomes a checked_ptr to
#    memory the whole threadgroup shares (orchard_emu::threadgroup_array);
#  - [[attributes]] ([[kernel]], [[buffer(n)]], [[host_name("...")]], ...) are removed.
# Nothing else changes and no line is added or removed, so line numbers (in diagnostics and in
# the emulator's reports) are those of the original file, which a #line directive names.
file(READ "${IN}" src)
string(REGEX REPLACE
  "([^A-Za-z0-9_])threadgroup[ \t]+([A-Za-z_][A-Za-z0-9_]*)[ \t]+([A-Za-z_][A-Za-z0-9_]*)\\[([A-Za-z0-9_]+)\\];"
  "\\1::orchard_emu::checked_ptr<\\2> \\3 = ::orchard_emu::threadgroup_array<\\2>(\\4);"
  src "${src}")
set(word "([^A-Za-z0-9_])(device|threadgroup)[ \t]+")
set(type "([A-Za-z_][A-Za-z0-9_]*)[ \t]*\\*")
string(REGEX REPLACE "${word}const[ \t]+${type}" "\\1::orchard_emu::checked_ptr<const \\3>" src "${src}")
string(REGEX REPLACE "${word}${type}" "\\1::orchard_emu::checked_ptr<\\3>" src "${src}")
string(REGEX REPLACE "\\[\\[[A-Za-z_]+(\\([^)]*\\))?\\]\\]" "" src "${src}")
file(WRITE "${OUT}.tmp" "#line 1 \"${IN}\"\n${src}")
# Touch the output only when it changes, so that editing one kernel rebuilds only what uses it.
file(COPY_FILE "${OUT}.tmp" "${OUT}" ONLY_IF_DIFFERENT)
file(REMOVE "${OUT}.tmp")

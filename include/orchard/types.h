// Orchard public types: dtypes, devices, backends, directions and the error type.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace orchard {

enum class DType : int8_t { f32, f16, bf16, f64, i32 };

enum class DeviceKind : int8_t { cpu, cuda, metal };

struct Device {
    DeviceKind kind = DeviceKind::cpu;
    int index = 0;
    bool operator==(const Device&) const = default;
};

// `automatic` picks the backend of the tensors' device. `reference` is the float64
// oracle of the CPU backend (materialises P: for tests and small problems only).
enum class Backend : int8_t { automatic, cpu, cuda, metal, reference };

enum class Direction : int8_t { forward, backward };

// What went wrong, so that bindings can map it (ValueError / NotImplementedError / RuntimeError).
enum class ErrorKind : int8_t { invalid_argument, unsupported, internal };

// Every error Orchard raises. The message names the op, the argument, what was expected and
// what was received: "orchard::forward: k has head_dim 64 but q has 128".
class Error : public std::runtime_error {
public:
    Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
    ErrorKind kind() const noexcept { return kind_; }

private:
    ErrorKind kind_;
};

const char* to_string(DType dtype);
const char* to_string(DeviceKind kind);
const char* to_string(Backend backend);
const char* to_string(Direction direction);
int64_t element_size(DType dtype);

}  // namespace orchard

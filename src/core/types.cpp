// Names and sizes of the public enums, and TensorView's constructors.
#include "orchard/tensor_view.h"
#include "orchard/types.h"

#include <string>

namespace orchard {

const char* to_string(DType dtype) {
    switch (dtype) {
        case DType::f32: return "float32";
        case DType::f16: return "float16";
        case DType::bf16: return "bfloat16";
        case DType::f64: return "float64";
        case DType::i32: return "int32";
    }
    return "unknown";
}

const char* to_string(DeviceKind kind) {
    switch (kind) {
        case DeviceKind::cpu: return "cpu";
        case DeviceKind::cuda: return "cuda";
        case DeviceKind::metal: return "metal";
    }
    return "unknown";
}

const char* to_string(Backend backend) {
    switch (backend) {
        case Backend::automatic: return "automatic";
        case Backend::cpu: return "cpu";
        case Backend::cuda: return "cuda";
        case Backend::metal: return "metal";
        case Backend::reference: return "reference";
    }
    return "unknown";
}

const char* to_string(Direction direction) {
    return direction == Direction::forward ? "forward" : "backward";
}

int64_t element_size(DType dtype) {
    switch (dtype) {
        case DType::f16:
        case DType::bf16: return 2;
        case DType::f32:
        case DType::i32: return 4;
        case DType::f64: return 8;
    }
    return 1;
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                                  Device device) {
    if (shape.size() > size_t(kMaxDims))
        throw Error(ErrorKind::invalid_argument,
                    "orchard::TensorView: at most 4 dimensions are supported but " +
                        std::to_string(shape.size()) + " were given");
    TensorView v;
    v.data = data;
    v.dtype = dtype;
    v.device = device;
    v.ndim = int(shape.size());
    int i = 0;
    for (int64_t s : shape) v.shape[i++] = s;
    int64_t stride = 1;
    for (int d = v.ndim - 1; d >= 0; --d) {
        v.strides[d] = stride;
        stride *= v.shape[d];
    }
    return v;
}

TensorView TensorView::strided(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               std::initializer_list<int64_t> strides, Device device) {
    TensorView v = contiguous(data, dtype, shape, device);
    if (strides.size() != shape.size())
        throw Error(ErrorKind::invalid_argument,
                    "orchard::TensorView: " + std::to_string(shape.size()) + " sizes but " +
                        std::to_string(strides.size()) + " strides");
    int i = 0;
    for (int64_t s : strides) v.strides[i++] = s;
    return v;
}

}  // namespace orchard

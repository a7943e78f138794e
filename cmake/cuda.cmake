# The CUDA backend: one translation unit per (dtype, padded head dim) kernel variant, generated
# from src/cuda/variant.cu.in, for the architectures in ORCHARD_CUDA_ARCHS.
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

set(ORCHARD_CUDA_GEN ${CMAKE_BINARY_DIR}/orchard_cuda)
set(ORCHARD_CUDA_SOURCES src/cuda/backend.cu)
set(orchard_variant_list "")
foreach(hd IN LISTS ORCHARD_CUDA_HEADDIMS)
  math(EXPR rem "${hd} % 16")
  if(rem OR hd LESS 32 OR hd GREATER 256)
    message(FATAL_ERROR "ORCHARD_CUDA_HEADDIMS: ${hd} is not a multiple of 16 in [32, 256]")
  endif()
  foreach(type IN ITEMS __half __nv_bfloat16)
    set(ORCHARD_VARIANT_TYPE ${type})
    set(ORCHARD_VARIANT_HD ${hd})
    set(file ${ORCHARD_CUDA_GEN}/variant${type}_hd${hd}.cu)
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/src/cuda/variant.cu.in ${file} @ONLY)
    list(APPEND ORCHARD_CUDA_SOURCES ${file})
  endforeach()
  string(APPEND orchard_variant_list "ORCHARD_CUDA_HD(${hd})\n")
endforeach()
file(CONFIGURE OUTPUT ${ORCHARD_CUDA_GEN}/cuda_variants.inc CONTENT "${orchard_variant_list}")

# As CMake's CUDA_ARCHITECTURES: "80" is sm_80 machine code plus compute_80 PTX, which the
# driver compiles for GPUs newer than any machine code in the build; "80-real" is the machine
# code alone, "80-virtual" the PTX alone.
set(ORCHARD_CUDA_GENCODE "")
set(ORCHARD_CUDA_HAS_SM90A OFF)
foreach(arch IN LISTS ORCHARD_CUDA_ARCHS)
  if(NOT arch MATCHES "^([0-9]+a?)(-real|-virtual)?$")
    message(FATAL_ERROR "ORCHARD_CUDA_ARCHS: '${arch}' is not of the form 80, 80-real, 80-virtual or 90a")
  endif()
  set(num ${CMAKE_MATCH_1})
  if(CMAKE_MATCH_2 STREQUAL "-real")
    set(code "sm_${num}")
  elseif(CMAKE_MATCH_2 STREQUAL "-virtual")
    set(code "compute_${num}")
  else()
    set(code "[sm_${num},compute_${num}]")
  endif()
  list(APPEND ORCHARD_CUDA_GENCODE "-gencode=arch=compute_${num},code=${code}")
  if(num STREQUAL "90a")
    set(ORCHARD_CUDA_HAS_SM90A ON)
  endif()
endforeach()

function(orchard_cuda_configure target)
  # CMake 3.25 has no CUDA20 dialect for nvcc: the flag is passed by hand (the core's headers
  # are C++20).
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES OFF CUDA_STANDARD_REQUIRED OFF)
  target_include_directories(${target} PRIVATE ${ORCHARD_CUDA_GEN})
  if(ORCHARD_CUDA_HAS_SM90A)  # the wgmma kernels exist (backend.cu picks them on Hopper)
    target_compile_definitions(${target} PRIVATE ORCHARD_CUDA_SM90A)
  endif()
  target_compile_options(${target} PRIVATE
    "$<$<COMPILE_LANGUAGE:CUDA>:${ORCHARD_CUDA_GENCODE};-std=c++20;--expt-relaxed-constexpr;-Xptxas=-warn-spills;-lineinfo>")
  # Static runtime: the binaries need only the driver (libcuda) on the machine that runs them.
  target_link_libraries(${target} PUBLIC CUDA::cudart_static)
endfunction()

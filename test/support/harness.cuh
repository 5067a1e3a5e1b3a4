/// @file harness.cuh
/// @brief Shared machinery of the GPU tests, one include: random inputs generated on the device
/// (device_data.cuh), on-device comparison against the fp64 reference (compare.cuh), case
/// specs, their data and reference, the outputs under test and the RESULT lines (cases.cuh),
/// and the handle, stream, workspace and graph a test holds (resources.cuh).
#pragma once

#include "cases.cuh"
#include "compare.cuh"
#include "device_data.cuh"
#include "resources.cuh"

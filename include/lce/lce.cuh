/// @file lce.cuh
/// @brief Umbrella header of lce, the fused linear cross-entropy library.
#pragma once

#include "args.hpp"
#include "backward.cuh"
#include "config.hpp"
#include "forward.cuh"
#include "forward_backward.cuh"
#include "options.hpp"
#include "status.hpp"
#include "version.hpp"

// Host stand-in for <cuda_runtime.h> (tests/kernels/cuda_emu).
#pragma once
#include "cuda_runtime_api.h"
#include "emu_device.h"

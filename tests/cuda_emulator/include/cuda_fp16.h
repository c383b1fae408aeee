// Emulated by tests/cuda_emulator (see emulator.h).
#pragma once
#include "emulator.h"

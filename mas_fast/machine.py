"""What hardware numbers come from: the names printed by `info`, the demo and the benchmarks."""
from __future__ import annotations

import os
import platform
import re

import torch


def cpu_name() -> str:
    """The CPU model and core count, e.g. 'AMD EPYC (2 cores)'."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def device_name(device: str = "cpu") -> str:
    """The GPU's name for a CUDA device, else the CPU's."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()

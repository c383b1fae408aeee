"""`python -m mas_fast demo | bench | info`."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Optional, Sequence


def info() -> int:
    """Print versions and which backends are built and usable here."""
    import torch

    from . import __version__
    from .machine import cpu_name, device_name
    from .ops import PRIORITY, backend_status

    print(f"mas_fast {__version__} | torch {torch.__version__} | Python {platform.python_version()}")
    gpu = device_name("cuda") if torch.cuda.is_available() else "no GPU"
    print(f"machine: {cpu_name()}, {gpu}")
    print("backends (auto tries them in the order " + " > ".join(PRIORITY) + "):")
    for name, reason in backend_status().items():
        print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    print("MAS state: 8 bytes per fp32 parameter (Ω + θ*), plus 8 during a task's importance pass; "
          "state_dtype=torch.bfloat16 keeps 4-6; FSDP2 shards Ω and θ* 1/world per rank "
          "(mas.memory_bytes(), docs/sharded.md)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mas_fast", description=__doc__)
    parser.add_argument("command", choices=("demo", "bench", "info"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_args(argv[:1]), argv[1:]  # the command's own flags (e.g. demo --help) go to it
    if args.command == "info":
        return info()
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    from .bench import main as bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())

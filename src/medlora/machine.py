"""What this machine's CPU offers: how many threads a compute engine (llama.cpp, the GGUF
quantizer) should use, and whether bfloat16 matrix products run natively."""

from __future__ import annotations

import os


def physical_cores() -> int:
    """CPU cores this process may run on, counting SMT siblings once: llama.cpp's matmuls gain
    nothing from a second hyper-thread on the same core, and its threads spin at every barrier,
    so a thread without a core of its own slows every other one down."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    try:
        import psutil  # installed with accelerate

        physical = psutil.cpu_count(logical=False) or usable
    except ImportError:
        physical = usable
    return max(1, min(usable, physical))


def default_threads() -> int:
    """`OMP_NUM_THREADS` when set (the usual cap on a shared machine, which torch obeys too), else
    the physical cores. Do not give llama.cpp more threads than free cores: its spinning threads
    collapse when they outnumber them (docs/benchmarks.md, "Inference")."""
    capped = os.environ.get("OMP_NUM_THREADS", "").strip()
    if capped.isdigit() and int(capped) > 0:
        return int(capped)
    return physical_cores()


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (`/proc/cpuinfo`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """True where bfloat16 GEMMs run in hardware (Intel AMX or AVX512-BF16), faster than fp32
    (docs/benchmarks.md, "CPU bf16"); on an AVX2-only CPU bf16 is emulated and slower."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"amx_bf16", "avx512_bf16"})

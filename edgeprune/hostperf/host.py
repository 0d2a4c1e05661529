"""What this host is and which runtimes it can time: CPU, cores, RAM, ISA flags, load, runtime versions."""

from __future__ import annotations

import os
import platform
import socket


def host_description() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        ram = int(psutil.virtual_memory().total)
        physical = psutil.cpu_count(logical=False) or cores
    except ImportError:
        ram = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        physical = cores
    return {"hostname": socket.gethostname(), "cpu": model, "cores": cores, "physical_cores": min(physical, cores),
            "ram": ram, "machine": platform.machine(), "system": platform.system()}


def isa_flags() -> tuple[str, ...]:
    """The SIMD extensions llama.cpp and onnxruntime kernels care about, as /proc/cpuinfo lists them."""
    try:
        flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return ()
    return tuple(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags)


def busy_warning(threads: int, timing: str, cores: int) -> str:
    """A hint when other jobs load the machine and the timing mode will suffer from it ('' if fine)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ""
    if timing == "wall" and load > 0.5 * cores:
        return (f"warning: load average {load:.1f} on {cores} cores: wall-clock timings will be slow and noisy "
                f"(multi-threaded llama.cpp worst); for a fit on a shared machine use threads=1, timing='cpu'")
    return ""


def runtime_version(backend: str) -> str:
    try:
        if backend == "llama.cpp":
            import llama_cpp

            return f"llama-cpp-python {llama_cpp.__version__}"
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    except ImportError:
        return "unavailable"


def backend_available(backend: str) -> tuple[bool, str]:
    """(ok, reason): whether this backend's exporter and runtime can be imported."""
    try:
        if backend == "llama.cpp":
            import llama_cpp  # noqa: F401

            from edgeprune.exporters.gguf import export_gguf  # noqa: F401
            from edgeprune.exporters.llamacpp import open_llama  # noqa: F401
        elif backend == "onnxruntime":
            import onnxruntime  # noqa: F401

            from edgeprune.exporters.onnx import OnnxDecoder, export_onnx  # noqa: F401
        else:
            return False, f"unknown backend {backend}"
    except ImportError as exc:
        return False, f"{backend} host measurement needs {exc.name or exc}"
    return True, ""

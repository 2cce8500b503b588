"""What every benchmark record says about the machine it ran on.

CPUs differ between machines (AVX2 on some, AVX-512 with or without AMX on others) and oneDNN picks
its kernels by the instruction set, capped by ONEDNN_MAX_CPU_ISA: a figure means little without
the CPU model, its ISA flags and the cap in force. `describe()` gives those (as `lscpu` names them,
read from /proc/cpuinfo where lscpu is missing) with the load average, torch, oneDNN and Python.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from typing import Any

# the flags that decide oneDNN's and ATen's kernels, in lscpu's spelling
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """(model name, set of CPU flags), from lscpu or /proc/cpuinfo; ("unknown", set()) elsewhere."""
    text = ""
    if shutil.which("lscpu"):
        try:
            text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                                  env={**os.environ, "LC_ALL": "C"}).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
    if not text and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M | re.I)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M | re.I)
    return (model.group(1).strip() if model else platform.processor() or "unknown",
            set(flags.group(1).split()) if flags else set())


def onednn_version() -> str | None:
    import torch

    found = re.search(r"(?:oneDNN|MKL-DNN) v([\d.]+)", torch.__config__.show())
    return found.group(1) if found else None


def describe(**extra: Any) -> dict[str, Any]:
    """The machine record of a benchmark JSON file; `extra` (settings of the run) is added as it is."""
    import torch

    model, flags = cpu_model_and_flags()
    info: dict[str, Any] = {
        "cpu_model": model,
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),  # None: the CPU's own best
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn": onednn_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info.update(extra)
    return info

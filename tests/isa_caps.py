"""oneDNN ISA caps for the tests that must hold on every x86 CPU, not only on the one that runs them.

oneDNN picks its kernels by the CPU's instruction set; ONEDNN_MAX_CPU_ISA makes it use no more
than the cap, so one AVX-512 machine also runs the AVX2 kernels (a cap above the machine's own ISA
is harmless). The cap is read once per process, so each capped run is a subprocess.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ISA_CAPS = ("AVX2", "AVX512_CORE", "AVX512_CORE_AMX")


def capped_env(cap: str) -> dict[str, str]:
    return {**os.environ, "ONEDNN_MAX_CPU_ISA": cap, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

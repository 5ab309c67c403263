"""``phiflash info``: versions, MLX device and the BLAS behind MLX's CPU matmuls."""

from __future__ import annotations

import argparse
import json
import platform
import sys

from .. import __version__
from .._blas import ENV_LIBRARY, ENV_SWITCH, blas_info


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show versions, the MLX device and which BLAS MLX uses on the CPU",
        description=(
            "Print the versions of phiflash-mlx, MLX, numpy and Python, the platform, "
            "MLX's default device, whether Metal is available, and which BLAS MLX's "
            "CPU matrix multiplies use. On Linux, phiflash routes them to the OpenBLAS "
            f"bundled with numpy; {ENV_SWITCH}=0 turns that off, {ENV_SWITCH}=1 warns "
            f"when it cannot be set up, and {ENV_LIBRARY}=PATH picks another BLAS."
        ),
        epilog=(
            "examples:\n"
            "  phiflash info\n"
            "  phiflash info --json\n"
            f"  {ENV_SWITCH}=0 phiflash info      # MLX's own BLAS, for comparison\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of text"
    )
    parser.set_defaults(func=run)


def _collect() -> dict:
    info: dict = {
        "phiflash_mlx": __version__,
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
    }
    try:
        import mlx.core as mx

        info["mlx"] = getattr(mx, "__version__", "unknown")
        info["default_device"] = str(mx.default_device())
        info["metal_available"] = bool(mx.metal.is_available())
    except Exception as exc:  # report, do not fail: this command is for diagnosing installs
        info["mlx"] = f"not importable ({exc})"
        info["default_device"] = None
        info["metal_available"] = None
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except Exception as exc:
        info["numpy"] = f"not importable ({exc})"
    info["blas"] = blas_info()
    try:
        from ..cpu_kernels import kernel_info

        info["cpu_kernels"] = kernel_info()
    except Exception as exc:
        info["cpu_kernels"] = {"active": False, "reason": str(exc)}
    return info


def run(args) -> int:
    info = _collect()
    if getattr(args, "json", False):
        json.dump(info, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0
    blas = info["blas"]
    rows = [
        ("phiflash-mlx", info["phiflash_mlx"]),
        ("mlx", info["mlx"]),
        ("numpy", info["numpy"]),
        ("python", info["python"]),
        ("platform", info["platform"]),
        ("default device", info["default_device"]),
        ("metal available", info["metal_available"]),
        ("cpu blas", blas["blas"]),
    ]
    if blas["active"]:
        rows += [
            ("  library", blas["library"]),
            ("  via", f"{blas['shim']} -> {blas['symbol']}"),
            ("  threads", blas["threads"]),
        ]
        if blas["config"]:
            rows.append(("  build", blas["config"]))
    elif blas["reason"]:
        rows.append(("  why", blas["reason"]))
    kern = info["cpu_kernels"]
    if kern["active"]:
        rows.append(("cpu decode kernels", f"phiflash C kernels ({kern['simd']}, {kern['threads']} threads)"))
        if "int8_activations" in kern:
            rows.append(("  4/8-bit products", f"int8 activations ({kern['int8_simd']}); PHIFLASH_CPU_INT8=0 for float32"
                         if kern["int8_activations"] else "float32 activations (PHIFLASH_CPU_INT8=0)"))
        if "kv16" in kern:
            rows.append(("  shared K/V cache", f"float16 (read with {kern['kv16_simd']}); PHIFLASH_CPU_KV16=0 for float32"
                         if kern["kv16"] else "float32 (PHIFLASH_CPU_KV16=0)"))
    else:
        rows.append(("cpu decode kernels", "off: MLX's own ops" + (f" ({kern['reason']})" if kern.get("reason") else "")))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key + ':':<{width + 1}} {value}")
    return 0

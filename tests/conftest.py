"""Shared test set-up: hypothesis profiles and the golden checkpoints.

Profiles: "ci" (derandomized, chosen automatically when CI is set), "dev" (the default, random).
Pick one with HYPOTHESIS_PROFILE=ci|dev.
"""

import os
import pathlib

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_DIR = pathlib.Path(os.environ.get("PHIFLASH_GOLDEN", ROOT.parent / "shared" / "golden"))
GOLDEN_MODELS = sorted(p.name for p in GOLDEN_DIR.glob("*") if (p / "vectors.npz").exists())


def golden_path(name: str) -> pathlib.Path:
    return GOLDEN_DIR / name


@pytest.fixture(params=GOLDEN_MODELS)
def golden_name(request):
    return request.param


@pytest.fixture
def float32_kv_caches():
    """The CPU attachment's 16-bit shared K/V cache off, for checks that hold the model to 1e-4
    (tests/test_cpu_kv16.py bounds what the 16-bit cache changes)."""
    from phiflash_mlx.cpu import kernels as cpu_kernels

    previous = cpu_kernels.set_kv16(False)
    yield
    cpu_kernels.set_kv16(previous)


def pytest_configure(config):
    if not GOLDEN_MODELS:
        raise pytest.UsageError(
            f"no golden checkpoints in {GOLDEN_DIR}: the tests compare against them. Run the tests from a "
            "checkout that has shared/golden beside it, or set PHIFLASH_GOLDEN=DIR (a folder of "
            "<name>/{config.json, model.safetensors, vectors.npz})")

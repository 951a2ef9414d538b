"""Test-wide set-up: four fake CPU devices (for sharding tests) before JAX is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OBCJAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache-test"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

"""Test setup: 8 virtual CPU devices so that sharding is exercised for real.

This must run before any JAX backend is initialised, hence at conftest import time.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep XLA from spawning more compile threads than the 2-core CI machine has.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices():
  assert len(jax.devices()) == 8, jax.devices()
  return jax.devices()

"""Test setup: 8 CPU devices for the multi-device tests, set before any backend is used."""

import jax

jax.config.update("jax_num_cpu_devices", 8)

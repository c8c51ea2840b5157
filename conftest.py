"""Runs before any test imports jax: 8 simulated CPU devices for the mesh/sharding tests."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

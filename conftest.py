"""Runs before any test imports jax: 8 simulated CPU devices for the mesh/sharding tests, and a
persistent compilation cache for each pytest process (xdist worker), so that a program compiled
by one test, or by its `python -m vit_jax.*` subprocesses (they inherit the environment), is read
by the next rather than compiled again. One per worker: two processes never write one entry."""
import os
import shutil
import signal
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# A shell starting the suite in the background (`make test &`, a script's `... &`) ignores
# SIGINT in it, and the commands the tests start inherit that, so one stopped by Ctrl-C (SIGINT)
# would train on, as vit_jax keeps a SIGINT ignored at its start: give them a terminal's default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

_OURS = 'VIT_JAX_TEST_COMPILATION_CACHE'  # Inherited by xdist workers from the controller.
if os.environ.get('JAX_COMPILATION_CACHE_DIR', '') in ('', os.environ.get(_OURS)):
  _CACHE = tempfile.mkdtemp(prefix='vit_jax_test_compilation_cache_')
  os.environ.update({_OURS: _CACHE, 'JAX_COMPILATION_CACHE_DIR': _CACHE,
                     'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                     'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'})

  def pytest_unconfigure(config):
    del config
    shutil.rmtree(_CACHE, ignore_errors=True)

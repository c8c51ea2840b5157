"""Fixtures shared by the test files (jax/XLA set-up lives in the root conftest.py)."""
import fcntl
import os

import pytest

# ---- Data -------------------------------------------------------------------


@pytest.fixture(scope='session')
def prepared_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir with `digits` and `fashion_mnist` prepared (offline).

  Prepared once per test run: pytest-xdist workers share the directory under a
  file lock (preparing is idempotent), so fashion_mnist's ~20 s is paid once.
  """
  from vit_jax.data import prepare  # Here, so TensorFlow loads only for data tests.
  run_dir = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    run_dir = run_dir.parent  # Shared by this run's workers.
  shared = run_dir / 'prepared_tfds'
  shared.mkdir(exist_ok=True)
  with open(shared / '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    for name in ('digits', 'fashion_mnist'):
      prepare.prepare(name, str(shared))
  return str(shared)

# ---- Training (reserved for the training loop's shared fixtures) -------------

# ---- Analysis ---------------------------------------------------------------


@pytest.fixture
def attention_passes(monkeypatch) -> list[int]:
  """How many images each pass of `vit_jax.analysis.run` sends through the model, in order."""
  from vit_jax.analysis import attention, run  # pylint: disable=import-outside-toplevel
  passes = []
  batches = attention.attention_batches

  def counted(model, variables, images, **kwargs):
    passes.append(len(images))
    return batches(model, variables, images, **kwargs)

  monkeypatch.setattr(run, 'attention_batches', counted)
  return passes

"""The notebooks: committed without outputs, a Colab set-up that stops with a clear error (and is
skipped elsewhere), and (slow) each runs top to bottom on CPU with the offline datasets."""
import os
import subprocess
import sys
import types

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ('inspect_checkpoint', 'finetune')


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(REPO, 'notebooks', f'{name}.ipynb'), as_version=4)


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_committed_clean_with_plain_python_only(name):
  notebook = _read(name)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  magics = [line for cell in code for line in cell.source.splitlines()
            if line.lstrip().startswith(('%', '!'))]
  assert not magics  # A failed %pip would not stop the cell; the set-up raises instead.


def _run_setup_cell(name: str, repo_url: str = '') -> None:
  """Runs the first code cell, with REPO_URL set to `repo_url`."""
  source = next(cell for cell in _read(name).cells if cell.cell_type == 'code').source
  assert source.count("REPO_URL = ''") == 1
  # pylint: disable-next=exec-used
  exec(source.replace("REPO_URL = ''", f'REPO_URL = {repo_url!r}'), {})


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_colab_setup_stops_without_a_repo_url_or_when_pip_fails(name, monkeypatch):
  calls = []

  def failing_pip(args, **kwargs):
    calls.append(args)
    return subprocess.CompletedProcess(args, 1, '', 'ERROR: could not clone')

  monkeypatch.setattr(subprocess, 'run', failing_pip)
  _run_setup_cell(name)  # Outside Colab the cell does nothing.
  monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('google.colab'))
  with pytest.raises(ValueError, match='set REPO_URL at the top of this cell'):
    _run_setup_cell(name)
  url = 'https://example.invalid/vit_jax.git'
  with pytest.raises(RuntimeError, match=f'pip could not install vit_jax from {url}: check '
                     'REPO_URL. pip said:\nERROR: could not clone'):
    _run_setup_cell(name, url)
  assert calls == [[sys.executable, '-m', 'pip', 'install', '-q', f'vit_jax @ git+{url}']]


@pytest.mark.slow  # About a minute each on 2 free cores (training included).
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_runs_top_to_bottom(name, prepared_data_dir, tmp_path):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, TFDS_DATA_DIR=prepared_data_dir, XLA_FLAGS='',
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
  notebook = _read(name)
  client = NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}})
  client.execute(env=env)
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  assert sum('image/png' in o.get('data', {}) for o in outputs) >= 2  # Figures were drawn.

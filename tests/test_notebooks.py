"""The notebooks: committed without outputs, Colab set-up skipped elsewhere, and (slow) each runs
top to bottom on CPU with the offline datasets."""
import os
import re

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ('inspect_checkpoint', 'finetune')


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(REPO, 'notebooks', f'{name}.ipynb'), as_version=4)


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_committed_clean_and_colab_setup_is_guarded(name):
  notebook = _read(name)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  first = code[0].source.splitlines()
  guard = first.index("if 'google.colab' in sys.modules:")
  installs = [i for i, line in enumerate(first) if re.match(r'\s*[%!]pip', line)]
  assert installs and all(i > guard and first[i].startswith('  ') for i in installs)
  magics = [line for cell in code[1:] for line in cell.source.splitlines()
            if line.lstrip().startswith(('%', '!'))]
  assert not magics  # Only the guarded set-up may need IPython or a network.


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

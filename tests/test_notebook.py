"""notebooks/load_and_predict.ipynb runs top to bottom on a checkpoint trained here."""

import os

import pytest

from ipykernel import kernelspec
import nbclient
import nbformat

from imgcls import train

NOTEBOOK = os.path.join(os.path.dirname(__file__), '..', 'notebooks', 'load_and_predict.ipynb')


def test_notebook_runs(tmp_path, data_dir, tiny_config, monkeypatch):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(data_dir, total_steps=3, eval_every_steps=3), workdir)
  # A kernel spec for this interpreter, so the kernel sees this environment's packages.
  kernelspec.install(kernel_name='imgcls-test', prefix=str(tmp_path / 'jupyter'))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter' / 'share' / 'jupyter'))
  monkeypatch.setenv('IMGCLS_WORKDIR', workdir)  # the kernel inherits the environment
  monkeypatch.setenv('IMGCLS_DATA_DIR', data_dir)
  monkeypatch.delenv('MPLBACKEND', raising=False)  # the kernel's inline backend draws PNGs

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, kernel_name='imgcls-test', timeout=600,
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  nbformat.write(nb, str(tmp_path / 'executed.ipynb'))  # to look at when it fails

  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'synthetic_shapes test: 37 images' in text
  assert 'top-1 on these 37 images' in text
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 2  # grid, confusion matrix
  assert "Classifier(model='resnet10'" in str(nb.cells[3].outputs)


pytestmark = pytest.mark.slow  # end to end in subprocesses (the CLI or a script)

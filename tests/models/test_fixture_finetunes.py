"""Every converted timm fixture (DINOv2, DINOv2-reg4, DINOv2 SwiGLU, SigLIP map and gap, CLIP,
CLIP-QuickGELU, ConvNeXt v1 and v2 in both MLP layouts) and big_vision's SigLIP .npz fine-tunes
end to end from the command line (`imgcls train --config.model.name=<timm name>
--config.model_init=<file>`, two steps on 16x16 synthetic images), and imgcls.load predicts from
its workdir with the init file's weights moved by exactly what training can move them.

One run starts a real `imgcls` process; the others go through the command's own code path in
this process (imgcls.main's flag parser, then main(): what `app.run` calls), which saves the
interpreter start and the imports of each."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import imgcls
from imgcls import optim
from imgcls.models import weights

import test_convnext  # the fixtures' readers, shared with the parity tests
import test_vit_backbones

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS, LR = 2, 1e-3
HEAD = ['params/head/bias', 'params/head/kernel']
# (case, fixture, timm name): every timm-made fixture with a timm name, and the SigLIP one in
# big_vision's layout. The ViTs fine-tune at 2x2 patches, the ConvNeXts at 32 px.
VIT_CASES = [(n, n, test_vit_backbones.TIMM_NAME[n]) for n in (
    'dinov2', 'dinov2_swiglu', 'siglip', 'siglip_gap', 'clip', 'clip_quickgelu')] + [
        ('siglip_big_vision_npz', 'siglip', 'vit_base_patch16_siglip_224')]
CONVNEXT_CASES = [('convnext', 'convnext', 'convnext_tiny'),
                  ('convnext_conv_mlp', 'convnext_conv_mlp', 'convnext_atto'),
                  ('convnextv2', 'convnextv2', 'convnextv2_tiny'),
                  ('convnextv2_conv_mlp', 'convnextv2_conv_mlp', 'convnextv2_atto')]


def _vit_run(case, fixture, name, tmp_path, data_dir):
  """(init file, `imgcls train` arguments, pooled feature width) of a ViT fixture."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  sd, config, _ = test_vit_backbones._fixture(fixture)  # pylint: disable=protected-access
  a = config['arch']
  if case.endswith('big_vision_npz'):  # the image tower of a two-tower .npz, blocks scanned
    init = tmp_path / 'siglip.npz'
    np.savez(init, **test_vit_backbones._big_vision(  # pylint: disable=protected-access
        sd, a['num_heads'], scanned=True))
    init = f'{init}:img'
  else:
    init = tmp_path / 'model.safetensors'
    save_file(sd, str(init))
  dims = [f'--config.model.{k}={a[v]}' for k, v in (
      ('width', 'embed_dim'), ('depth', 'depth'), ('num_heads', 'num_heads'),
      ('mlp_dim', 'mlp_hidden'), ('patch_size', 'patch_size'))]
  return str(init), _train_args('finetune_vit_backbones.py', f'size={2 * a["patch_size"]}', name,
                                init, dims, tmp_path / 'w', data_dir), a['embed_dim']


def _convnext_run(fixture, name, tmp_path, data_dir):
  """(init file, `imgcls train` arguments, pooled feature width) of a ConvNeXt fixture."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  sd, config, _ = test_convnext._fixture(fixture)  # pylint: disable=protected-access
  init = tmp_path / 'model.safetensors'
  save_file(sd, str(init))
  kw = config['kwargs']
  dims = [f'--config.model.depths={tuple(kw["depths"])}',
          f'--config.model.dims={tuple(kw["dims"])}']
  return str(init), _train_args('finetune_convnext.py', 'size=32', name, init, dims,
                                tmp_path / 'w', data_dir), kw['dims'][-1]


def _train_args(recipe, arg, name, init, model_flags, workdir, data_dir):
  return ['train', f'--config={ROOT}/configs/{recipe}:dataset=synthetic_shapes,classes=4,'
          f'batch=16,warmup=0,lr={LR},{arg}', f'--workdir={workdir}',
          f'--config.dataset.data_dir={data_dir}', f'--config.model.name={name}',
          f'--config.model_init={init}', *model_flags, f'--config.total_steps={STEPS}',
          f'--config.eval_every_steps={STEPS}', '--config.log_every_steps=1',
          '--config.async_checkpoints=False', '--config.evals.eval.reports=False']


def _imgcls(argv, monkeypatch):
  """`imgcls ARGV...` in this process: imgcls.main's flag parser and main(), as app.run calls
  them, from the flags' defaults; the environment and the flags are restored afterwards."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from imgcls import main  # pylint: disable=g-import-not-at-top
  argv = ['imgcls', *argv]
  # Parsing --verbosity (default: WARNING) sets absl's logger level; later tests read its INFO.
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads its overrides from sys.argv
  monkeypatch.setattr(main, '_MODEL_ARGS', {})
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))  # main may add to it
  flags.FLAGS.unparse_flags()
  try:
    main.main(main._parse_flags(argv))  # pylint: disable=protected-access
  finally:  # config_flags defines a flag per override as it parses: drop them for the next run
    for flag in [f for f in flags.FLAGS if f.startswith('config.')]:
      delattr(flags.FLAGS, flag)
    flags.FLAGS.unparse_flags()
    absl_logger.setLevel(level)  # after unparse_flags, which sets it again


def _check(workdir, init, name, width):
  """imgcls.load predicts from the workdir, and its parameters are the init file's (converted
  as the run did) moved by what two AdamW steps at the run's lr and layer decay move them."""
  clf = imgcls.load(workdir)
  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
  pred = clf.predict(images, top_k=2)
  assert len(pred) == 3 and all(len(p) == 2 for p in pred)
  probs = np.asarray(clf.probabilities(images))
  assert probs.shape == (3, 4) and np.isfinite(probs).all()
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert clf.features(images).shape == (3, width)
  assert clf.config['model']['name'] == name and clf.step == STEPS

  # The merge report the run wrote: everything loaded but the head (7 classes there, 4 here).
  report = json.loads((pathlib.Path(workdir) / 'model_init_report.json').read_text())
  assert not any(report[k] for k in ('missing', 'unused', 'ignored', 'mismatched')), report
  assert sorted(r.split(':')[0] for r in report['reinitialised']) == HEAD, report
  template = jax.tree.map(np.zeros_like, jax.device_get(clf.variables))
  start, again = weights.load_pretrained(init, template, posemb_resize='source')
  assert again.resized == report['resized']  # ViTs: the position grid resized to 2x2

  opt = ml_collections.ConfigDict(clf.config['optimizer'])
  assert opt.layer_decay > 0
  mults = optim.Rules(opt).lr_mults(start['params'])
  flat = lambda t: {optim.param_path(p): np.asarray(x)  # noqa: E731
                    for p, x in jax.tree_util.tree_leaves_with_path(t)}
  new, old, mult = flat(clf.variables['params']), flat(start['params']), flat(mults)
  assert sorted(new) == sorted(old)
  for path in new:
    # Step 1 moves only the zero-initialised head by the lr (no gradient reaches the backbone
    # through it); step 2, at half the lr (cosine over 2 steps), moves each parameter by 0.74
    # of that per element (Adam's bias correction). The attention key bias gets no gradient
    # (softmax ignores a logit shift common to all keys), so it stays where it started.
    moved = float(np.max(np.abs(new[path] - old[path]))) / (LR * float(mult[path]))
    want = ((1.3, 1.7) if path.startswith('head/') else
            (0.0, 0.01) if path.endswith('key/bias') else (0.3, 0.6))
    assert want[0] <= moved < want[1], (path, moved, want)
  return report


@pytest.mark.parametrize('case,fixture,name', VIT_CASES, ids=[c[0] for c in VIT_CASES])
def test_vit_fixture_finetunes_from_the_cli_and_loads(case, fixture, name, data_dir, tmp_path,
                                                      monkeypatch):
  init, args, width = _vit_run(case, fixture, name, tmp_path, data_dir)
  _imgcls(args, monkeypatch)
  report = _check(tmp_path / 'w', init, name, width)
  assert report['fmt'] == ('vit_npz' if case.endswith('npz') else 'timm_vit')
  # The position grid resized to 2x2, as the source does (plus the class token's own entry).
  a = test_vit_backbones._fixture(fixture)[1]['arch']  # pylint: disable=protected-access
  tokens = 4 + (a['class_token'] and not a['no_embed_class'])
  method = 'zoom_linear' if case.endswith('npz') else 'bicubic_timm'
  assert [r.endswith(f'-> {tokens} tokens ({method})') for r in report['resized']] == [True], (
      report['resized'])


@pytest.mark.parametrize('case,fixture,name', CONVNEXT_CASES,
                         ids=[c[0] for c in CONVNEXT_CASES])
def test_convnext_fixture_finetunes_from_the_cli_and_loads(case, fixture, name, data_dir,
                                                           tmp_path, monkeypatch):
  del case
  init, args, width = _convnext_run(fixture, name, tmp_path, data_dir)
  _imgcls(args, monkeypatch)
  report = _check(tmp_path / 'w', init, name, width)
  assert report['fmt'] == 'timm_convnext' and not report['resized']


@pytest.mark.slow  # a real `imgcls` process
def test_dinov2_reg4_finetunes_from_the_imgcls_command_and_loads(data_dir, tmp_path):
  """`imgcls train --config.model.name=vit_small_patch14_reg4_dinov2 --config.model_init=<timm
  .safetensors>` (4 classes: the 7-class head is re-initialised, the 4x4 position grid resized
  to 2x2 as timm does), then imgcls.load predicts from the workdir."""
  init, args, width = _vit_run('dinov2_reg4', 'dinov2_reg4', 'vit_small_patch14_reg4_dinov2',
                               tmp_path, data_dir)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, '-m', 'imgcls.main', *args], capture_output=True,
                        text=True, timeout=600, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stderr + proc.stdout
  assert 'reinitialised' in out and 'bicubic_timm' in out  # the merge report
  _check(tmp_path / 'w', init, 'vit_small_patch14_reg4_dinov2', width)

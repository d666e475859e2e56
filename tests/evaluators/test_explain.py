"""Explanations pass objective checks on small models trained multi-label on 2x2 mosaics
(scripts/explain_check.py): pointing game, parameter randomisation (Adebayo et al. 2018),
deletion; plus shapes, class specificity, integrated gradients' completeness and the files
`imgcls explain` writes."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

import imgcls
from imgcls import checkpoints
from imgcls.errors import UserError
from imgcls.evaluators import explain as ex

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location('explain_check', ROOT / 'scripts/explain_check.py')
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

NUM_TEST = check.TEST_MOSAICS  # about 100 (image, present class) pairs


@pytest.fixture(scope='module')
def mosaics():
  items, labels, _ = check.items('train')
  test_items, test_labels, _ = check.items('test')
  x, y, _ = check.mosaics(items, labels, check.VIT_TRAIN, 0, 'train')
  xt, _, tiles = check.mosaics(test_items, test_labels, NUM_TEST, 0, 'test')
  return x, y, xt, tiles


@pytest.fixture(scope='module')
def resnet(mosaics):
  x, y, _, _ = mosaics
  n = check.RESNET_TRAIN  # the first mosaics of the ViT's
  return check.classifier(check.RESNET, check.train(check.RESNET, x[:n], y[:n],
                                                     check.RESNET_STEPS))


@pytest.fixture(scope='module')
def vit(mosaics):
  x, y, _, _ = mosaics
  n = check.VIT_TRAIN
  return check.classifier(check.VIT, check.train(check.VIT, x[:n], y[:n], check.VIT_STEPS))


def _random(config):
  return check.classifier(config, check.init(config, seed=123))


# ------------------------------------------------------------ objective checks

@pytest.mark.parametrize('model, method', [('resnet', 'gradcam'), ('vit', 'grad_attention')])
def test_pointing_game(model, method, mosaics, request):
  """Each present class's map peaks in its item's quadrant for >= 85% of pairs (chance 25%),
  for models trained as scripts/explain_check.py trains them (docs/reliability.md: by seed)."""
  clf = request.getfixturevalue(model)
  _, _, xt, tiles = mosaics
  assert check.pointing_game(clf, xt, tiles, method) >= 0.85


def test_attention_rollout_is_class_agnostic(vit, mosaics):
  """Rollout has no target class: one map per image whatever the class asked for; its
  pointing-game figure is reported (scripts/explain_check.py), not held to 85%."""
  _, _, xt, tiles = mosaics
  a = ex.explain(vit, xt[:2], 'attention_rollout', target=0)
  b = ex.explain(vit, xt[:2], 'attention_rollout', target=1)
  np.testing.assert_array_equal(a, b)
  assert 0.0 <= check.pointing_game(vit, xt, tiles, 'attention_rollout') <= 1.0


@pytest.mark.parametrize('model, config, method', [('resnet', check.RESNET, 'gradcam'),
                                                   ('vit', check.VIT, 'grad_attention')])
def test_randomised_weights_change_the_maps(model, config, method, mosaics, request):
  """Adebayo et al.: the trained and the re-initialised model's maps rank pixels differently."""
  clf = request.getfixturevalue(model)
  _, _, xt, tiles = mosaics
  assert check.randomisation(clf, _random(config), xt, tiles, method) < 0.5


@pytest.mark.parametrize('model, method, n', [('resnet', 'gradcam', NUM_TEST),
                                              ('vit', 'grad_attention', NUM_TEST),
                                              ('resnet', 'integrated_gradients', 8)])
def test_deleting_the_top_pixels_lowers_the_probability_more(model, method, n, mosaics, request):
  clf = request.getfixturevalue(model)
  _, _, xt, tiles = mosaics
  top, random = check.deletion(clf, xt[:n], tiles[:n], method)
  assert top > random


# ------------------------------------------------------------------ units

def test_spearman_by_hand():
  a = np.array([1.0, 2.0, 3.0, 4.0])
  assert check.spearman(a, a ** 3) == pytest.approx(1.0)
  assert check.spearman(a, -a) == pytest.approx(-1.0)
  assert check.spearman(a, np.zeros(4)) == 0.0
  np.testing.assert_allclose(check._ranks(np.array([3.0, 1.0, 3.0, 2.0])), [2.5, 0, 2.5, 1])


@pytest.mark.parametrize('model, methods', [
    ('resnet', ('auto', 'gradcam', 'integrated_gradients')),
    ('vit', ('auto', 'grad_attention', 'attention_rollout'))])
def test_maps_have_the_image_shape_and_are_finite(model, methods, mosaics, request):
  clf = request.getfixturevalue(model)
  image = mosaics[2][0]
  for method in methods:
    maps = ex.explain(clf, [image, image[..., 0]], method, steps=8)
    assert len(maps) == 2
    for m in maps:
      assert m.shape == image.shape[:2] and m.dtype == np.float32
      assert np.all(np.isfinite(m)) and m.std() > 0
    np.testing.assert_allclose(maps[0], maps[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('model, method', [('resnet', 'gradcam'), ('vit', 'grad_attention')])
def test_an_absent_class_gets_another_map(model, method, mosaics, request):
  clf = request.getfixturevalue(model)
  _, _, xt, tiles = mosaics
  i = next(i for i, row in enumerate(tiles) if len(set(row) - {-1}) < 4)
  present = int(next(c for c in tiles[i] if c >= 0))
  absent = int(next(c for c in range(10) if c not in tiles[i]))
  a, b = ex.explain(clf, [xt[i], xt[i]], method, target=[present, str(absent)])
  assert not np.allclose(a / (np.abs(a).max() + 1e-12), b / (np.abs(b).max() + 1e-12), atol=0.05)


def test_integrated_gradients_completeness(resnet, mosaics):
  """Attributions sum to S(x) - S(baseline) (the logits) given enough steps."""
  x = resnet.preprocess(list(mosaics[2][:4]))
  targets = jnp.array([0, 3, 5, 9])
  base = jnp.full_like(x, -1.0)  # a black image after value_range(-1, 1)
  attr = ex.integrated_gradients(resnet.model, resnet.variables, jnp.asarray(x), targets, base,
                                 128)
  logits = lambda v: resnet.model.apply(resnet.variables, v)[np.arange(4), targets]  # noqa: E731
  np.testing.assert_allclose(attr.sum(axis=(1, 2, 3)), logits(x) - logits(base),
                             rtol=0.02, atol=0.05)


def test_method_errors(resnet, vit, mosaics):
  image = mosaics[2][0]
  with pytest.raises(UserError, match='unknown explanation method'):
    ex.explain(resnet, image, 'lime')
  with pytest.raises(UserError, match='needs a ViT'):
    ex.explain(resnet, image, 'attention_rollout')
  with pytest.raises(UserError, match='needs a CNN'):
    ex.explain(vit, image, 'gradcam')
  with pytest.raises(UserError, match='not a label'):
    ex.explain(resnet, image, target='boot')
  with pytest.raises(UserError, match='2 entries for 1 images'):
    ex.explain(resnet, image, target=[0, 1])


def test_eval_reports_confident_error_grid_gets_overlays(data_dir, tiny_config, tmp_path):
  """The classification evaluator explains the predicted class of the grid's images only (the
  family's default method, Grad-CAM here) and draws it over them; uint8 batches as in a run."""
  from imgcls import data, evaluators, models, optim, parallel, train  # noqa: PLC0415
  c = tiny_config(data_dir, value_range_on_device=True)
  c.evals.eval = dict(type='classification', reports=True, keep_images=4)
  mesh = parallel.make_mesh(jax.devices()[:2])
  model = models.from_config(c)
  context, (ev,) = evaluators.from_config(c, model, mesh, data.builder_for(c.dataset))
  tx, _ = optim.make_optimizer(c, 10)
  state = train.init_state(model, tx, 0, context.image_shape(), mesh)
  noise = jax.tree.map(lambda p: 0.1 * np.random.default_rng(0).normal(size=p.shape), state.params)
  state = state.replace(params=jax.tree.map(lambda p, n: p + n.astype(p.dtype), state.params,
                                            noise))  # a zero-initialised head has no gradient
  calls = []
  original = ex.grid_maps
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ex, 'grid_maps', lambda *a, **k: calls.append(a[3].shape) or original(*a, **k))
    ev(state)
  assert calls == [(4, 16, 16, 1)]  # the grid's 4 images, nothing else
  with_maps = ev._report.images['confident_errors']
  ev.write(str(tmp_path), 1, None)
  assert Image.open(tmp_path / 'confident_errors_1.png').size == with_maps.shape[1::-1]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ex, 'grid_maps', lambda *a, **k: [np.zeros(a[3].shape[1:3])] * len(a[3]))
    ev(state)  # maps that draw nothing: the plain images under the same title
  plain = ev._report.images['confident_errors']
  assert with_maps.shape == plain.shape and np.mean(np.any(with_maps != plain, -1)) > 0.01


def test_explain_files_writes_overlays_and_maps(resnet, mosaics, tmp_path):
  """What `imgcls explain` writes: <stem>.png overlays and <stem>.npy maps at the image size."""
  variables = jax.device_get(resnet.variables)
  meta = {'config': resnet.config, 'image_shape': list(resnet.image_shape),
          'label_names': resnet.label_names}
  state = {'step': np.int32(1), 'params': variables['params'],
           'batch_stats': variables['batch_stats'], 'opt_state': np.zeros(1, np.float32),
           'rng': np.zeros(2, np.uint32)}
  ckpt = checkpoints.Checkpointer(str(tmp_path / 'run'), asynchronous=False)
  ckpt.save(1, state, meta, metrics={'top1': 0.5})
  ckpt.close()
  files = []
  for i, folder in enumerate(('a', 'b')):
    (tmp_path / folder).mkdir()
    files.append(str(tmp_path / folder / 'item.png'))
    Image.fromarray(mosaics[2][i][..., 0]).save(files[-1])
  out = tmp_path / 'out'
  written = ex.explain_files(imgcls.load(str(tmp_path / 'run')), str(out), files)
  assert sorted(pathlib.Path(p).name for p in written) == [
      'item-1.npy', 'item-1.png', 'item.npy', 'item.png']
  saliency = np.load(out / 'item.npy')
  assert saliency.shape == (32, 32) and saliency.dtype == np.float32
  np.testing.assert_allclose(saliency, ex.explain(resnet, mosaics[2][0])[0], rtol=1e-4,
                             atol=1e-6)
  assert Image.open(out / 'item-1.png').size == (32, 32)
  with pytest.raises(UserError, match='no image files'):
    ex.explain_files(imgcls.load(str(tmp_path / 'run')), str(out), [])

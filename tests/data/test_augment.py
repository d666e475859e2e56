"""Batch mixup / CutMix: label mass, one coefficient for images and labels, switching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgcls import augment


def _batch(n=8, h=12, w=10, k=5):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(n, h, w, 3)).astype(np.float32))
  labels = jnp.asarray(np.eye(k, dtype=np.float32)[rng.integers(0, k, n)])
  return images, labels


@pytest.mark.parametrize('seed', range(4))
def test_mixup_mixes_images_and_labels_with_the_same_lam(seed):
  images, labels = _batch()
  cfg = augment.MixConfig(mixup_alpha=0.4)
  out, mixed, lam = augment.mix_batch(jax.random.PRNGKey(seed), images, labels, cfg)
  lam = float(lam)
  assert 0.0 <= lam <= 1.0
  np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mixed, lam * labels + (1 - lam) * labels[::-1], rtol=1e-6)
  np.testing.assert_allclose(np.sum(mixed, -1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('seed', range(4))
def test_cutmix_lam_is_the_kept_area(seed):
  images, labels = _batch()
  cfg = augment.MixConfig(cutmix_alpha=1.0)
  out, mixed, lam = augment.mix_batch(jax.random.PRNGKey(seed), images, labels, cfg)
  out, images = np.asarray(out), np.asarray(images)
  from_self = np.all(out == images, axis=-1)
  from_partner = np.all(out == images[::-1], axis=-1)
  assert np.all(from_self | from_partner)  # every pixel comes whole from one of the pair
  pasted = from_partner[0] & ~from_self[0]  # example 0 and its partner differ everywhere
  np.testing.assert_allclose(float(lam), 1 - pasted.mean(), atol=1e-6)
  np.testing.assert_allclose(mixed, lam * labels + (1 - lam) * labels[::-1], rtol=1e-6)
  np.testing.assert_allclose(np.sum(mixed, -1), 1.0, rtol=1e-6)
  if pasted.any():  # one rectangle
    ys, xs = np.nonzero(pasted)
    assert pasted.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)


def test_switch_prob_and_prob():
  images, labels = _batch()
  kinds = []
  for seed in range(40):
    out, _, lam = augment.mix_batch(jax.random.PRNGKey(seed), images, labels,
                                    augment.MixConfig(0.8, 1.0, switch_prob=0.5))
    whole = np.all((np.asarray(out) == np.asarray(images)) |
                   (np.asarray(out) == np.asarray(images[::-1])))
    kinds.append('cutmix' if whole and float(lam) < 1 else 'mixup')
  assert 5 < kinds.count('cutmix') < 35  # both are used
  untouched = [float(augment.mix_batch(jax.random.PRNGKey(s), images, labels,
                                       augment.MixConfig(0.8, prob=0.0))[2]) for s in range(5)]
  assert untouched == [1.0] * 5
  out, mixed, lam = augment.mix_batch(jax.random.PRNGKey(0), images, labels, augment.MixConfig())
  assert out is images and mixed is labels and float(lam) == 1.0

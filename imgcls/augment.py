"""Batch-level augmentation on device: mixup and CutMix (timm's Mixup, 'batch' mode).

Runs inside the per-device train step, on this device's shard: each example is mixed
with the example at the mirrored position of the shard (timm pairs with the flipped
batch the same way) using one coefficient `lam` for the whole shard. With both alphas
set, CutMix is picked with probability `switch_prob`, else mixup; with probability
1 - `prob` the batch is left alone (lam = 1). Labels are mixed with exactly the
coefficient the images got: for CutMix that is 1 - (pasted area / image area) after the
box is clipped to the image, so one-hot label mass stays 1.

Written by hand: optax and flax have no mixup; timm's is PyTorch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MixConfig(NamedTuple):
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  switch_prob: float = 0.5
  prob: float = 1.0

  @property
  def active(self) -> bool:
    return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def cutmix_mask(rng: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
  """A [H, W] float mask, 1 inside a box of about (1 - lam) of the area at a uniform centre."""
  ry, rx = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = jnp.round(height * ratio), jnp.round(width * ratio)
  cy = jax.random.randint(ry, (), 0, height)
  cx = jax.random.randint(rx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  return ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).astype(jnp.float32)


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array,
              cfg: MixConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(images [B, H, W, C], labels [B, K]) -> mixed images, mixed labels, and lam."""
  if not cfg.active:
    return images, labels, jnp.ones((), jnp.float32)
  r_apply, r_switch, r_mix, r_cut, r_box = jax.random.split(rng, 5)
  partner_images, partner_labels = images[::-1], labels[::-1]

  def beta(r, alpha):
    return jax.random.beta(r, alpha, alpha) if alpha > 0 else jnp.ones((), jnp.float32)

  use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(r_switch) < cfg.switch_prob
  apply = jax.random.uniform(r_apply) < cfg.prob

  # mixup: a convex combination of the two images.
  lam_mix = beta(r_mix, cfg.mixup_alpha)
  mixed = lam_mix * images + (1.0 - lam_mix) * partner_images
  # CutMix: a box of the partner pasted in; lam is corrected to the box's real area.
  height, width = images.shape[1:3]
  box = cutmix_mask(r_box, beta(r_cut, cfg.cutmix_alpha), height, width)
  lam_cut = 1.0 - jnp.mean(box)
  cut = images * (1.0 - box[None, :, :, None]) + partner_images * box[None, :, :, None]

  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0)
  out_images = jnp.where(apply, jnp.where(use_cutmix, cut, mixed), images)
  out_labels = lam * labels + (1.0 - lam) * partner_labels
  return out_images.astype(images.dtype), out_labels.astype(labels.dtype), lam

"""ViT-B/16 trained from scratch on ImageNet-1k, the original ViT recipe.

Published: the ViT paper (Dosovitskiy et al., 2021) reports 77.9% ImageNet top-1 for ViT-B/16
trained on ImageNet-1k alone (and 84.15% pre-trained on JFT-300M), which DeiT quotes as its
baseline. Recipe, the paper's Table 3 (ImageNet row) and its training setup: Adam (b1 0.9,
b2 0.999), batch 4096, 300 epochs, base learning rate 3e-3 with 10k warmup steps then cosine,
weight decay 0.3, dropout 0.1, global-norm clip 1.0, class-token pooling with a pre-logits
layer, inception crop 224 + flip. Here the decay is optax.adamw's (scaled by the learning rate);
check that against the paper's implementation before relying on the exact value. big_vision's later AugReg variant adds RandAugment(2, 15) and mixup 0.5 over 300 epochs.
Not reproduced here: it needs TFDS's imagenet2012 (manual download) and TPUs or GPUs.

  imgcls train --config=configs/imagenet_vit_b16.py --workdir=gs://BUCKET/vit_b16
Variants: --config=configs/imagenet_vit_b16.py:variant=S/16,epochs=90
"""

from imgcls.config import defaults, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, variant='B/16', batch=4096, epochs=300.0)
  c = defaults()
  c.dataset.name = 'imagenet2012'
  c.dataset.num_classes = 1000
  c.dataset.eval_split = 'validation'
  c.dataset.cache = False
  c.dataset.shuffle_buffer = 250_000
  c.pp_train = 'decode(3)|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(1000)'
  c.pp_eval = 'decode(3)|resize_small(256)|central_crop(224)|value_range(-1, 1)|onehot(1000)'
  c.model.name = 'vit'
  c.model.variant = arg.variant
  c.model.pool = 'tok'
  c.model.representation_size = int(arg.variant.startswith('B')) * 768 or None
  c.model.dropout = 0.1
  c.model.dtype = 'bfloat16'
  c.batch_size = arg.batch
  c.eval_batch_size = 1024
  c.num_epochs = arg.epochs
  c.optimizer.name = 'adamw'
  c.lr.base = 3e-3
  c.lr.schedule = 'warmup_cosine'
  c.lr.warmup_steps = 10_000
  c.weight_decay = 0.3
  c.grad_clip_norm = 1.0
  c.log_every_steps = 50
  return c

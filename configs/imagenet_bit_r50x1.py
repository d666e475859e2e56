"""BiT-S R50x1 (ResNet-V2 with GroupNorm and weight standardisation) on ImageNet-1k.

Recipe of the BiT paper (Kolesnikov et al., 2020) as big_vision's bit_i1k.py runs it: 90
epochs, batch 4096, SGD momentum 0.9 with learning rate 0.1 and (decoupled) weight decay 1e-4,
both per 256 images, global-norm clip 1.0, 1000 warmup steps then cosine (the paper decays in steps at
epochs 30, 60, 80), inception crop 224 + flip, value range [-1, 1]. big_vision quotes ~32 min
on a v3-128 for it. The paper's headline ILSVRC-2012 numbers are for transfer (BiT-L 87.5%
top-1); the accuracy of this 1k-only upstream run is not stated in either source and is left
to be measured when a reader with accelerators runs it.

  imgcls train --config=configs/imagenet_bit_r50x1.py --workdir=gs://BUCKET/bit_r50x1
Variants: --config=configs/imagenet_bit_r50x1.py:model=bit_r101x1,batch=1024
"""

from imgcls.config import defaults, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model='bit_r50x1', batch=4096, epochs=90.0)
  c = defaults()
  c.dataset.name = 'imagenet2012'
  c.dataset.num_classes = 1000
  c.dataset.eval_split = 'validation'
  c.dataset.cache = False
  c.dataset.shuffle_buffer = 250_000
  c.pp_train = 'decode(3)|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(1000)'
  c.pp_eval = 'decode(3)|resize_small(256)|central_crop(224)|value_range(-1, 1)|onehot(1000)'
  c.model.name = arg.model
  c.batch_size = arg.batch
  c.eval_batch_size = 1024
  c.num_epochs = arg.epochs
  c.optimizer.name = 'sgd'
  c.optimizer.nesterov = False
  c.lr.base = 0.1 * arg.batch / 256
  c.lr.schedule = 'warmup_cosine'
  c.lr.warmup_steps = 1000
  # big_vision decays by (1e-4 / 256 * batch) * schedule, decoupled; imgcls's SGD adds L2 to
  # the gradient, which lr = 0.1 * batch / 256 scales: the same decay per step is 1e-4.
  c.weight_decay = 1e-4
  c.grad_clip_norm = 1.0
  c.log_every_steps = 50
  return c

"""ResNet-50 v1.5 on ImageNet-1k (ILSVRC-2012), the recipe of flax/examples/imagenet.

Published: flax/examples/imagenet reports 76.72% top-1 on the validation set after 100 epochs
(its v100_x8 config: batch 512 on 8 V100s, 250k steps, 13.7 h; 76.47% with mixed precision).
Recipe: SGD with Nesterov momentum 0.9, learning rate 0.1 per 256 images with a 5-epoch linear
warmup and cosine decay, weight decay 1e-4 (torchvision-style L2, kernels only here), inception
crop 224 + flip for training, resize 256 + central crop 224 for eval, ImageNet mean/std.
Not reproduced here: it needs TFDS's imagenet2012 (manual download) and accelerators.

  imgcls train --config=configs/imagenet_resnet50.py --workdir=gs://BUCKET/rn50 \
      --config.dataset.data_dir=gs://BUCKET/tfds
Variants: --config=configs/imagenet_resnet50.py:batch=1024,epochs=90
"""

from imgcls.config import defaults, parse_arg

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def get_config(arg=None):
  arg = parse_arg(arg, batch=512, epochs=100.0)
  c = defaults()
  c.dataset.name = 'imagenet2012'
  c.dataset.num_classes = 1000
  c.dataset.eval_split = 'validation'
  c.dataset.cache = False  # 150 GB of JPEGs
  c.dataset.shuffle_buffer = 16 * 1024
  norm = f'normalize({MEAN_RGB}, {STDDEV_RGB})'
  c.pp_train = f'decode(3)|inception_crop(224)|flip_lr|{norm}|onehot(1000)'
  c.pp_eval = f'decode(3)|resize_small(256)|central_crop(224)|{norm}|onehot(1000)'
  c.model.name = 'resnet50'
  c.batch_size = arg.batch
  c.eval_batch_size = 1000
  c.num_epochs = arg.epochs
  c.optimizer.name = 'sgd'
  c.optimizer.nesterov = True
  c.lr.base = 0.1 * arg.batch / 256
  c.lr.schedule = 'warmup_cosine'
  c.lr.warmup_steps = 5 * 1_281_167 // arg.batch
  c.weight_decay = 1e-4
  c.log_every_steps = 100
  return c

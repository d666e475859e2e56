"""Fine-tuning recipes: the ViT paper's and BiT-HyperRule, for five standard target datasets.

  imgcls train --config=configs/transfer.py:model=vit_b16,dataset=cifar10,init=ViT-B_16.npz \
      --workdir=gs://BUCKET/ft/vit_b16_cifar10
  imgcls train --config=configs/transfer.py:model=bit_r50x1,dataset=oxford_iiit_pet,init=BiT-M-R50x1.npz \
      --workdir=gs://BUCKET/ft/bit_pets

`init` is the pretrained checkpoint you downloaded (official ViT/BiT .npz, a timm .safetensors,
or an imgcls workdir); its head is re-initialised (zero) for the target classes and ViT position
embeddings are resized to the 384 px grid. Datasets: cifar10, cifar100, oxford_iiit_pet,
oxford_flowers102, imagenet2012 (TFDS; imagenet2012 needs its manual download).

ViT (Dosovitskiy et al. 2021; google-research/vision_transformer): SGD momentum 0.9, batch 512,
global-norm clip 1.0, no weight decay, 500 warmup steps then cosine, 384 px, learning rate 0.03
(vit_jax's default; the paper sweeps 0.001-0.03), 10k steps for CIFAR, 500 for Pets and Flowers,
20k for ImageNet; the pre-logits layer of ImageNet-21k checkpoints is dropped. The
vision_transformer README reports ViT-B/16 (ImageNet-21k) at CIFAR-10 99.02%, CIFAR-100 92.06%,
ImageNet 84.53% this way.

BiT-HyperRule (Kolesnikov et al. 2020; google-research/big_transfer): SGD momentum 0.9, batch
512, learning rate 0.003 divided by 10 at 30%, 60% and 90% of the steps, no weight decay; 500
steps below 20k examples, 10k below 500k, else 20k; images under 96x96 px resized to 160 and
randomly cropped to 128, larger ones to 448 and 384. The big_transfer README reports BiT-M
R50x1 at CIFAR-10 97.3% and CIFAR-100 86.4%. BiT-HyperRule's MixUp (alpha 0.1 above 20k
examples) is `mixup.mixup_alpha`.
"""

from imgcls.config import ConfigError, defaults, parse_arg

# name: (classes, train split, eval split, train examples, small images (< 96x96))
DATASETS = {
    'cifar10': (10, 'train[:98%]', 'test', 49_000, True),
    'cifar100': (100, 'train[:98%]', 'test', 49_000, True),
    'oxford_iiit_pet': (37, 'train', 'test', 3_680, False),
    'oxford_flowers102': (102, 'train', 'test', 1_020, False),
    'imagenet2012': (1000, 'train[:99%]', 'validation', 1_268_355, False),
}
VIT_STEPS = {'cifar10': 10_000, 'cifar100': 10_000, 'oxford_iiit_pet': 500,
             'oxford_flowers102': 500, 'imagenet2012': 20_000}


def get_config(arg=None):
  arg = parse_arg(arg, model='vit_b16', dataset='cifar10', init='', batch=512)
  if arg.dataset not in DATASETS:
    raise ConfigError(f'configs/transfer.py: dataset={arg.dataset!r} is not one of '
                      f'{", ".join(DATASETS)}.')
  classes, train_split, eval_split, examples, small = DATASETS[arg.dataset]
  c = defaults()
  c.dataset.name = arg.dataset
  c.dataset.num_classes = classes
  c.dataset.train_split = train_split
  c.dataset.eval_split = eval_split
  c.dataset.cache = arg.dataset != 'imagenet2012'
  c.model.name = arg.model
  c.model_init = arg.init
  c.batch_size = arg.batch
  c.eval_batch_size = 500
  c.optimizer.name = 'sgd'
  c.optimizer.nesterov = False
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  c.log_every_steps = 50
  c.eval_every_steps = 500
  norm = f'value_range(-1, 1)|onehot({classes})'
  if arg.model.startswith('vit'):
    c.total_steps = VIT_STEPS[arg.dataset]
    c.lr.base = 0.03
    c.lr.schedule = 'warmup_cosine'
    c.lr.warmup_steps = 500
    c.model_load.ignore = 'pre_logits'
    c.pp_train = f'decode(3)|inception_crop(384, area_min=5)|flip_lr|{norm}'
    c.pp_eval = f'decode(3)|resize(384)|{norm}'
  elif arg.model.startswith('bit'):
    c.total_steps = 500 if examples < 20_000 else 10_000 if examples < 500_000 else 20_000
    c.lr.base = 0.003
    c.lr.schedule = 'warmup_step'
    c.lr.warmup_steps = 0
    c.lr.decay_boundaries = (0.3, 0.6, 0.9)
    c.lr.decay_factor = 0.1
    resize, crop = (160, 128) if small else (448, 384)
    c.pp_train = f'decode(3)|resize({resize})|random_crop({crop})|flip_lr|{norm}'
    c.pp_eval = f'decode(3)|resize({crop})|{norm}'
    c.mixup.mixup_alpha = 0.1 if examples >= 20_000 else 0.0
  else:
    raise ConfigError(f'configs/transfer.py has recipes for vit_* and bit_* models, not '
                      f'{arg.model!r}.')
  c.eval_every_steps = min(c.eval_every_steps, c.total_steps)
  return c

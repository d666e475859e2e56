"""Multi-label demo: 2x2 mosaics of Fashion-MNIST items, labelled with the set of items shown.

  imgcls train --config=configs/fashion_mnist_mosaic.py --workdir=workdirs/mosaic

The dataset `fashion_mnist_mosaic` (imgcls/data/mosaic_builder.py, its source in mosaic.py) is built offline from the prepared
Fashion-MNIST (56x56x1, 1-4 items each; 60k train / 10k test, or the 6k / 1k config
`fashion_mnist_mosaic/small` with :size=small). Labels are multi-hot (`multihot(10)`), the
loss is a sigmoid cross-entropy, and each eval reports mAP, per-class AP and micro/macro F1
at 0.5 and at the threshold that maximises micro F1 on a held-out 10% of the train split
(reports/ in the workdir). A ResNet-18 of width 16 with the ImageNet stem (14x14 from
stage 1, the cost of the 28 px quickstart per image). Reaches test mAP 0.949 in 5 min 20 s
(3 epochs) on a 2-core Intel Xeon CPU.
"""

from imgcls.config import defaults, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, epochs=3.0, width=16, size='default')
  if arg.size not in ('default', 'small'):
    raise ValueError(f"size must be 'default' or 'small', got {arg.size!r}")
  c = defaults()
  c.dataset.name = 'fashion_mnist_mosaic' + ('/small' if arg.size == 'small' else '')
  c.dataset.num_classes = 10
  c.dataset.train_split = 'train[:90%]'
  c.dataset.val_split = 'train[90%:]'
  c.dataset.eval_split = 'test'
  c.pp_train = 'decode|flip_lr|value_range(-1, 1)|multihot(10)'
  c.pp_eval = 'decode|value_range(-1, 1)|multihot(10)'
  c.loss = 'sigmoid_xent'
  c.model.name = 'resnet18'
  c.model.width = arg.width
  c.model.stem = 'imagenet'
  c.batch_size = 128
  c.num_epochs = arg.epochs
  c.optimizer.name = 'sgd'
  c.lr.base = 0.1
  c.lr.warmup_steps = 200
  c.weight_decay = 5e-4
  c.log_every_steps = 100
  return c

"""A longer ResNet-18 run on Fashion-MNIST, aiming at 94% test top-1.

Width 32, stride-2 3x3 stem (14x14 from stage 1), padded random crops, flips and random
erasing (p=0.5, noise fill, as in Zhong et al.'s Fashion-MNIST runs), label smoothing,
SGD-Nesterov with warmup + cosine, 30 epochs: 94.2% test top-1 in about an hour on a 2-core
Intel Xeon (AMX) CPU (docs/results.md).
Variants: --config=configs/fashion_mnist_resnet.py:epochs=15,width=64,stem=small,erase=0
  tta=flip  scores the test set with each image's mirror too (`eval_*`, the checkpoint
            ranking) and without it (`plain_*`)
  Under 30 minutes: epochs=18,batch=256,lr=0.2,dtype=auto,tta=flip
       --config.eval_every_steps=1404
  95%: epochs=40,width=64,dtype=auto,tta=flip, then a second cycle from its
       weights: epochs=12,width=64,lr=0.02,dtype=auto,tta=flip
       --config.model_init=WORKDIR_OF_THE_FIRST
"""

from imgcls.config import defaults, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, epochs=30.0, width=32, stem='small_s2', batch=128,
                  erase=0.5, dtype='float32', lr=0.1, tta='')
  c = defaults()
  c.dataset.name = 'fashion_mnist'
  c.dataset.num_classes = 10
  erase = f'|random_erasing({arg.erase}, value="normal")' if arg.erase else ''
  c.pp_train = f'decode|random_crop(28, pad=2)|flip_lr|value_range(-1, 1){erase}|onehot(10)'
  c.pp_eval = 'decode|value_range(-1, 1)|onehot(10)'
  c.model.name = 'resnet18'
  c.model.width = arg.width
  c.model.stem = arg.stem
  c.model.dtype = arg.dtype
  c.batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.optimizer.name = 'sgd'
  c.lr.base = arg.lr
  c.lr.warmup_steps = 500
  c.weight_decay = 5e-4
  c.label_smoothing = 0.1
  c.log_every_steps = 200
  if arg.tta:
    # An explicit list: turn its reports off with --config.evals.eval.reports=False.
    c.evals.eval = dict(type='classification', tta=arg.tta)
    c.evals.plain = dict(type='classification', reports=False)
  return c

"""Long-tailed Fashion-MNIST (imbalance ratio 100: 6,000 train images of class 0 down to 60 of
class 9, 14,886 in all; the test set balanced), the quickstart's narrow ResNet-18 at 28 px.

Variants (same recipe and steps; balanced test accuracy = mean per-class recall, measured in
docs/results.md and /work/notes/imbalance_figures.md):
  loss=ce                 plain cross-entropy (the baseline)
  loss=la                 logit-adjusted loss, tau=1 (Menon et al. 2021)
  loss=posthoc            cross-entropy, logits - tau * log(prior) at eval and prediction
  loss=balanced_sampling  cross-entropy on class-balanced batches (dataset.sampling)
  loss=cw                 cross-entropy with 'balanced' class weights
Other knobs: --config=configs/fashion_mnist_lt.py:loss=la,tau=1.5,ratio=10,epochs=8
"""

from imgcls.config import defaults, parse_arg

VARIANTS = ('ce', 'la', 'posthoc', 'balanced_sampling', 'cw')


def get_config(arg=None):
  arg = parse_arg(arg, loss='ce', tau=1.0, ratio=100.0, epochs=6.0, width=16, batch=128)
  if arg.loss not in VARIANTS:
    raise ValueError(f'loss={arg.loss!r}: choose one of {", ".join(VARIANTS)}.')
  c = defaults()
  c.dataset.name = 'fashion_mnist_lt'
  c.dataset.imbalance_ratio = arg.ratio
  c.dataset.num_classes = 10
  c.pp_train = 'decode|flip_lr|value_range(-1, 1)|onehot(10)'
  c.pp_eval = 'decode|value_range(-1, 1)|onehot(10)'
  c.model.name = 'resnet18'
  c.model.width = arg.width
  c.model.stem = 'small_s2'
  c.batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.optimizer.name = 'sgd'
  c.lr.base = 0.1
  c.lr.warmup_steps = 100
  c.weight_decay = 5e-4
  c.label_smoothing = 0.0  # plain cross-entropy, as Menon et al.'s baseline
  c.log_every_steps = 100
  if arg.loss == 'la':
    c.imbalance.logit_adjust_tau = arg.tau
  elif arg.loss == 'posthoc':
    c.imbalance.posthoc_tau = arg.tau
  elif arg.loss == 'balanced_sampling':
    c.dataset.sampling = 'balanced'
  elif arg.loss == 'cw':
    c.imbalance.class_weights = 'balanced'
  return c

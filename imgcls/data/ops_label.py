"""Label pp ops, registered with label_op=True (inference drops them: preprocess.image_only):
onehot (single-label), multihot (multi-label), keep."""

from __future__ import annotations

from imgcls.data.preprocess import Features, Op, register
from imgcls.registry import lazy_import

tf = lazy_import('tensorflow')


@register('onehot', label_op=True)
def get_onehot(num_classes: int, key: str = 'label', key_result: str = 'labels',
               on: float = 1.0, off: float = 0.0) -> Op:
  """Integer label -> float32 one-hot [num_classes] under key_result."""
  if not (isinstance(num_classes, int) and num_classes > 0):
    raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')

  def onehot(features: Features) -> Features:
    features = dict(features)
    features[key_result] = tf.one_hot(features[key], num_classes, on, off, dtype=tf.float32)
    return features
  return onehot


@register('multihot', label_op=True)
def get_multihot(num_classes: int, key: str = 'labels', key_result: str = 'labels',
                 on: float = 1.0, off: float = 0.0) -> Op:
  """Class ids (a variable-length list, one int, or a ragged batch) -> float32 multi-hot.

  A list [k] gives [num_classes], a scalar id its one-hot, a ragged [B, None] batch
  [B, num_classes]; repeated ids count once and an empty list gives all `off`. An id outside
  [0, num_classes) fails instead of being dropped (tf.one_hot would drop it silently).
  """
  if not (isinstance(num_classes, int) and num_classes > 0):
    raise ValueError(f'num_classes must be a positive int, got {num_classes!r}')

  def multihot(features: Features) -> Features:
    features = dict(features)
    ids = features[key]
    if not isinstance(ids, tf.RaggedTensor):
      ids = tf.convert_to_tensor(ids)
    values = tf.cast(ids.flat_values if isinstance(ids, tf.RaggedTensor) else ids, tf.int64)
    checks = [tf.debugging.assert_non_negative(
                  values, message=f'multihot: a class id in {key!r} is negative'),
              tf.debugging.assert_less(
                  values, tf.constant(num_classes, tf.int64),
                  message=f'multihot({num_classes}): a class id in {key!r} is >= '
                  f'{num_classes}; set num_classes to the dataset\'s number of classes')]
    if isinstance(ids, tf.RaggedTensor):
      ids = ids.to_tensor(default_value=-1)  # tf.one_hot(-1) is all zeros: padding adds nothing.
    elif ids.shape.rank == 0:
      ids = ids[None]
    with tf.control_dependencies(checks):
      hot = tf.one_hot(tf.cast(ids, tf.int64), num_classes, dtype=tf.float32)
      hot = tf.minimum(tf.reduce_sum(hot, axis=-2), 1.0)  # Repeated ids count once.
    features[key_result] = off + (on - off) * hot
    return features
  return multihot


@register('keep', label_op=True)
def get_keep(*keys: str) -> Op:
  """Keeps only `keys` (and the internal '_' keys the pipeline needs)."""
  def keep(features: Features) -> Features:
    return {k: v for k, v in features.items() if k in keys or k.startswith('_')}
  return keep

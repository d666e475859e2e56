"""Data: TFDS sources (offline Fashion-MNIST, synthetic, image folders), pp ops, pipelines."""

# mosaic registers the 'multihot' pp op and the TFDS builder 'fashion_mnist_mosaic'.
from imgcls.data import mosaic
from imgcls.data.pipeline import EvalData, eval_data, train_iterator
from imgcls.data.preprocess import get_pp_fn, image_only, list_ops, register
from imgcls.data.sources import (DataError, builder_for, check_num_classes, class_label,
                                 get_builder, label_names, num_examples, prepare, prepare_for)
from imgcls.data.synthetic import make_synthetic_dataset

__all__ = [
    'DataError', 'EvalData', 'builder_for', 'check_num_classes', 'class_label', 'eval_data',
    'get_builder', 'get_pp_fn', 'image_only', 'label_names', 'list_ops',
    'make_synthetic_dataset', 'mosaic', 'num_examples', 'prepare', 'prepare_for', 'register',
    'train_iterator',
]

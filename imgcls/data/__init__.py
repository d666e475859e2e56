"""Data: TFDS sources (offline Fashion-MNIST, synthetic, image folders), pp ops, pipelines."""

# mosaic registers the 'multihot' pp op and the TFDS builder 'fashion_mnist_mosaic'.
from imgcls.data import mosaic
from imgcls.data.pipeline import EvalData, eval_data, train_iterator
from imgcls.data.preprocess import get_pp_fn, list_ops, register
from imgcls.data.sources import (DataError, check_num_classes, get_builder, num_examples,
                                 prepare)
from imgcls.data.synthetic import make_synthetic_dataset

__all__ = [
    'DataError', 'EvalData', 'check_num_classes', 'eval_data', 'get_builder', 'get_pp_fn',
    'list_ops',
    'make_synthetic_dataset', 'mosaic', 'num_examples', 'prepare', 'register', 'train_iterator',
]

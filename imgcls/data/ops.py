"""Importing this registers every built-in pp op in preprocess.OPS (imgcls.data does it).

The registry and the parser are in preprocess.py; the ops in ops_image.py, ops_label.py and
randaugment.py, and the fusions of adjacent ops in ops_fused.py, import it, so preprocess.py
cannot import them back: this module does. randaugment.py's ops are only declared here (name
and module): a pp string that uses one imports it.
"""

from imgcls.data import ops_fused, ops_image, ops_label
from imgcls.data.preprocess import OPS

for _name in ('randaugment', 'color_jitter'):
  OPS.declare(_name, 'imgcls.data.randaugment', label_op=False)

__all__ = ['ops_fused', 'ops_image', 'ops_label']

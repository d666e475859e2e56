"""Train or fine-tune on your own images: a folder with one subfolder per class.

  root/CLASS/*.jpg|png|...               split 80/10/10 per class (seeded: folder_seed)
  root/{train,val,test}/CLASS/*          your own splits

Images of any size and format (grayscale, CMYK and RGBA become RGB); unreadable files stop
the run with their names, or are left out and counted with --config.dataset.skip_corrupt=True.
Training evaluates on `validation`, or on `test` when the folder has no validation split
(root/{train,test}/CLASS; eval_split= chooses another); score the test split afterwards with
`imgcls eval --workdir=... --split=test`.

Model size: width= (resnet*, bit, vit*), stem= (resnet*: imagenet | small | small_s2),
variant= (vit: e.g. S/16), depth= and patch_size= (vit*) are set on the model when given; a
model without that argument fails validation with the model's valid keys.

  imgcls train --config=configs/image_folder.py:root=/data/xrays,classes=3 --workdir=runs/xr
Fine-tune from pretrained weights (an official .npz, a timm/torchvision .safetensors or
another run's workdir; the head is re-initialised for your classes):
  imgcls train --config=configs/image_folder.py:root=/data/xrays,classes=3,init=resnet18.safetensors,size=224 \
      --workdir=runs/xr_ft
"""

from imgcls.config import ConfigError, defaults, parse_arg
from imgcls.data import folder

# Model size arguments the config argument passes on to c.model when given (not the default).
MODEL_ARGS = {'width': 0, 'stem': '', 'variant': '', 'depth': 0, 'patch_size': 0}


def get_config(arg=None):
  arg = parse_arg(arg, root='', classes=0, size=128, model='resnet18', init='', epochs=20.0,
                  batch=32, lr=0.01, eval_split='', **MODEL_ARGS)
  if not arg.root or arg.classes <= 0:
    raise ConfigError('configs/image_folder.py needs root= (the image folder) and classes= (the '
                      'number of class subfolders), e.g. '
                      '--config=configs/image_folder.py:root=/data/xrays,classes=3')
  c = defaults()
  c.dataset.name = f'folder:{arg.root}'
  c.dataset.num_classes = arg.classes
  # '': validation if the folder has it, else test (decided from a quick look at the folder).
  c.dataset.eval_split = arg.eval_split or folder.eval_split(c.dataset.name,
                                                             c.dataset.folder_split)
  c.dataset.shuffle_buffer = 10_000
  s, n = arg.size, arg.classes
  c.pp_train = (f'decode(3)|inception_crop({s}, area_min=35)|flip_lr|value_range(-1, 1)|'
                f'onehot({n})')
  c.pp_eval = f'decode(3)|resize_small({s})|central_crop({s})|value_range(-1, 1)|onehot({n})'
  c.model.name = arg.model
  for key, unset in MODEL_ARGS.items():
    if arg[key] != unset:
      c.model[key] = arg[key]
  c.model_init = arg.init
  c.batch_size = arg.batch
  c.eval_batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.optimizer.name = 'sgd'
  c.lr.base = arg.lr
  c.lr.warmup_steps = 50
  c.weight_decay = 1e-4
  c.label_smoothing = 0.1
  c.log_every_steps = 10
  return c

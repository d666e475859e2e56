"""Fine-tune a pretrained ConvNeXt (v1 or v2, any timm size) on an image folder or a TFDS dataset.

  imgcls train --config=configs/finetune_convnext.py:root=/data/xrays,classes=3,init=model.safetensors \
      --workdir=runs/xr_convnext
  imgcls train --config=configs/finetune_convnext.py:dataset=oxford_iiit_pet,classes=37,init=model.safetensors \
      --workdir=runs/pets_convnext

`init` is a timm ConvNeXt state dict, e.g. `model.safetensors` of the Hugging Face repo
timm/convnext_tiny.fb_in1k (`model=` names the size: convnext_tiny by default, any
convnext_* or convnextv2_* name); its head is re-initialised (zero) for your classes. The
resolution (224) and the ImageNet mean/std come with the model name (its registry info): the
pp strings say '{resolution}' and '{normalize}', filled in when the config is validated, so
`--config.model.name=convnextv2_tiny` brings its own (imgcls.data.preprocess.PLACEHOLDER).
`size=` fixes the resolution instead.
ConvNeXt-T reaches 82.1% ImageNet-1k top-1 at 224 px (Liu et al. 2022, "A ConvNet for the
2020s", Table 1); ConvNeXt V2-T fine-tuned after FCMAE pre-training, 83.0% (Woo et al. 2023).

Optimisation: AdamW, cosine decay after `warmup` steps (100), weight decay 0.05, stochastic depth 0.1
and layer-wise lr decay 0.8 (optimizer.layer_decay) over the 12 layer groups of the official
ConvNeXt fine-tuning code (facebookresearch/ConvNeXt, optim_factory.get_num_layer_for_convnext):
stem 0, stages 1-2 their index, stage 3 in groups of three blocks, stage 4 the last group, head
undecayed. imgcls.optim groups the model's actual parameters when the optimizer state is
created, so `--config.model.name=convnext_base` (27 blocks in stage 3) is decayed as its own.
"""

from imgcls.config import ConfigError, defaults, finetune_dataset, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, model='convnext_tiny', init='', root='', dataset='oxford_iiit_pet',
                  classes=37, train_split='train', eval_split='', size=0, epochs=30.0,
                  batch=128, lr=1e-4, warmup=100, layer_decay=0.8,
                  stoch_depth=0.1)
  # Imported here: the registry says which names are ConvNeXts.
  from imgcls.models import convnext  # noqa: F401  pylint: disable=g-import-not-at-top
  from imgcls.models.registry import MODELS  # pylint: disable=g-import-not-at-top
  if arg.model not in MODELS or MODELS.info(arg.model).get('family') != 'convnext':
    raise ConfigError(f'configs/finetune_convnext.py fine-tunes convnext_* and convnextv2_* '
                      f'models, not {arg.model!r}.')
  if arg.classes <= 0:
    raise ConfigError('configs/finetune_convnext.py needs classes= (the number of classes).')
  c = defaults()
  n, s = arg.classes, arg.size or '{resolution}'
  finetune_dataset(c, arg)
  norm = f'normalize_preset("{{normalize}}")|onehot({n})'
  c.pp_train = f'decode(3)|inception_crop({s})|flip_lr|{norm}'
  resize = round(arg.size / 0.875) if arg.size else '{resolution/0.875}'  # timm's crop_pct
  c.pp_eval = (f'decode(3)|resize_small({resize}, method="bicubic", antialias=True)|'
               f'central_crop({s})|{norm}')

  c.model.name = arg.model
  c.model.stoch_depth = arg.stoch_depth
  c.model_init = arg.init
  c.batch_size = c.eval_batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.optimizer.name = 'adamw'
  c.lr.base = arg.lr
  c.lr.schedule = 'warmup_cosine'
  c.lr.warmup_steps = arg.warmup
  c.weight_decay = 0.05
  c.optimizer.layer_decay = arg.layer_decay  # imgcls.optim.convnext_layer_id's groups
  return c

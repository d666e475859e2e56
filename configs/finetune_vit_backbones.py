"""Fine-tune or linearly probe a DINOv2, SigLIP / SigLIP 2 or CLIP backbone, by its timm name, on
an image folder or a TFDS dataset.

  imgcls train --config=configs/finetune_vit_backbones.py:model=vit_base_patch14_reg4_dinov2,root=/data/xrays,classes=3,init=model.safetensors \
      --workdir=runs/xr_dinov2
  imgcls train --config=configs/finetune_vit_backbones.py:model=vit_base_patch16_siglip_224,dataset=oxford_iiit_pet,classes=37,init=model.safetensors,mode=linear \
      --workdir=runs/pets_siglip_probe

`model=` is any timm DINOv2, SigLIP or CLIP name (default vit_base_patch16_siglip_224).
`init` is the backbone's timm state dict (`model.safetensors` of the Hugging Face repo, e.g.
timm/vit_base_patch14_reg4_dinov2.lvd142m, timm/vit_base_patch16_siglip_224.v2_webli,
timm/vit_base_patch16_clip_224.openai), or big_vision's SigLIP .npz with its image tower
selected as big_vision's load_params does (`init=webli_en_b16_224.npz:img`). The head is
re-initialised (zero) for your classes (these backbones ship without one). The resolution and
the normalisation come with the name (registry info): ImageNet mean/std for DINOv2, [-1, 1]
for SigLIP, CLIP's mean/std for CLIP; the pp strings say '{resolution}' and '{normalize}',
filled in when the config is validated, so `--config.model.name=OTHER` brings OTHER's
(imgcls.data.preprocess.PLACEHOLDER). `size=` fine-tunes at another resolution, the position
embeddings resized on load as the source does (timm's antialiased bicubic; big_vision's
scipy zoom for its .npz): model_load.posemb_resize='source'.

mode=finetune (default): AdamW, cosine decay after `warmup` steps, weight decay 0.05,
stochastic depth 0.1 and layer-wise lr decay (`layer_decay`, default 0.75: block i of depth d
at layer_decay ** (d + 1 - (i + 1)), the patch/position embeddings, class and register tokens
and CLIP's pre-norm as layer 0, as timm's group_matcher and the BEiT / MAE fine-tuning recipes
that DINOv2, SigLIP and CLIP fine-tunes follow; MAE used 0.65 for ViT-B and 0.75 for ViT-L/H).
mode=linear: the backbone frozen (optimizer.freeze: everything but the head), a linear head on
the pooled features (class token, average or MAP head as the backbone pools) trained with SGD
(momentum 0.9), no weight decay, no layer decay: the linear evaluation of the papers below.

Published numbers, ImageNet-1k top-1 (what these recipes aim to reproduce in kind):
  DINOv2 linear probe on frozen features, ViT-S/14 81.1%, B/14 84.5%, L/14 86.3%, g/14 86.5%
    (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision"; the
    same figures are in the facebookresearch/dinov2 model table).
  CLIP linear probe, OpenAI ViT-B/32 76.1%, B/16 80.2%, L/14 83.9%, L/14 at 336 px 85.4%
    (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision", linear-probe results in its appendix).
  SigLIP So400m/14 at 384 px: about 83% zero-shot (Zhai et al. 2023, "Sigmoid Loss for
    Language Image Pre-Training"); SigLIP 2 (Tschannen et al. 2025) reports its own table.
"""

from imgcls.config import ConfigError, defaults, finetune_dataset, parse_arg

MODES = ('finetune', 'linear')


def get_config(arg=None):
  arg = parse_arg(arg, model='vit_base_patch16_siglip_224', init='', root='',
                  dataset='oxford_iiit_pet', classes=37, train_split='train', eval_split='', size=0, epochs=30.0,
                  batch=128, lr=0.0, warmup=100, layer_decay=0.75, stoch_depth=0.1,
                  mode='finetune')
  # Imported here: the names this recipe knows (the registry's timm ViT names).
  from imgcls.models import vit  # pylint: disable=g-import-not-at-top
  if arg.model not in vit.TIMM_NAMES:
    raise ConfigError(f'configs/finetune_vit_backbones.py fine-tunes the timm DINOv2, SigLIP '
                      f'and CLIP names (imgcls.models.vit.TIMM_NAMES), not {arg.model!r}.')
  if arg.classes <= 0:
    raise ConfigError('configs/finetune_vit_backbones.py needs classes= (the number of '
                      'classes).')
  if arg.mode not in MODES:
    raise ConfigError(f'configs/finetune_vit_backbones.py mode= is one of {", ".join(MODES)}, '
                      f'not {arg.mode!r}.')
  c = defaults()
  n, s = arg.classes, arg.size or '{resolution}'
  finetune_dataset(c, arg)
  norm = f'normalize_preset("{{normalize}}")|onehot({n})'
  c.pp_train = f'decode(3)|inception_crop({s})|flip_lr|{norm}'
  # timm's crop_pct is 1.0 for these weights: resize the short side to the size, crop the centre.
  c.pp_eval = (f'decode(3)|resize_small({s}, method="bicubic", antialias=True)|'
               f'central_crop({s})|{norm}')

  c.model.name = arg.model
  c.model_init = arg.init
  c.model_load.posemb_resize = 'source'
  c.batch_size = c.eval_batch_size = arg.batch
  c.num_epochs = arg.epochs
  c.lr.schedule = 'warmup_cosine'
  c.lr.warmup_steps = arg.warmup
  if arg.mode == 'finetune':
    c.model.stoch_depth = arg.stoch_depth
    c.optimizer.name = 'adamw'
    c.lr.base = arg.lr or 5e-5
    c.weight_decay = 0.05
    c.optimizer.layer_decay = arg.layer_decay
  else:
    c.optimizer.name = 'sgd'
    c.lr.base = arg.lr or 1e-2
    c.weight_decay = 0.0
    c.optimizer.freeze = ('^(?!head/)',)
  return c

"""Reference fixtures from timm, and checks that imgcls-written .npz files load in timm.

imgcls's tests compare its models against timm without importing torch: this script,
run once with a separate Python 3.11 venv that has timm, writes small models with
random weights, their inputs and their logits to tests/fixtures/timm/*.npz.

Setup (outside the repo; torch and torchvision must be a matched pair):

  python3.11 -m venv /work/timm-venv
  /work/timm-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
  /work/timm-venv/bin/pip install timm numpy

Usage (from the repo root):

  /work/timm-venv/bin/python scripts/timm_fixtures.py [generate] [--out_dir=DIR]
  /work/timm-venv/bin/python scripts/timm_fixtures.py check-vit-npz FILE.npz EXPECTED.npy \
      [--fixture=vit_tok|vit_gap|PATH.npz] [--model_args=JSON] [--prefix=P] [--atol=1e-4]
  /work/timm-venv/bin/python scripts/timm_fixtures.py check-bit-npz FILE.npz EXPECTED.npy \
      [--fixture=bit|PATH.npz] [--model_args=JSON] [--prefix=resnet/] [--atol=1e-4]

generate writes vit_tok.npz, vit_gap.npz, resnet_bottleneck.npz and bit.npz, then the
ConvNeXt fixtures (generate-convnext writes only those: see CONVNEXT_SPECS) and the ViT
backbone ones (generate-vit-backbones: VIT_BACKBONE_SPECS, and vit_backbones_table.json, timm's
architecture facts and parameter counts of every registered DINOv2/SigLIP/CLIP name). Each holds
  sd/<key>  every state_dict tensor (num_batches_tracked left out) as float32, in
            timm's own layout (OIHW convs, [out, in] linears),
  input     the batch, NHWC float32 [2, 32, 32, 3]; timm is fed its NCHW transpose,
  logits    timm's eval-mode float32 logits for that input,
  config    a JSON string: the timm class and constructor arguments (callables written
            as {"callable": "module.name", "kwargs": {...}}), any change made after
            construction, the seeds, the versions and notes on the forward semantics.

check-vit-npz / check-bit-npz build the model described by a fixture's config (vit_tok
by default; --fixture=vit_gap for the global-average-pool ViT; bit for BiT), optionally
with constructor arguments overridden by --model_args (a JSON object, e.g.
'{"no_embed_class": true}'), fill every parameter with NaN, load FILE.npz with timm's
own loader for Google's .npz checkpoints (model.load_pretrained, i.e. _load_weights in
timm/models/vision_transformer.py or resnetv2.py), run the fixture's input and compare
with EXPECTED.npy. It prints the max abs difference and exits 1 when it is over --atol,
when the shapes differ, or when the loader left any parameter unset (still NaN). Keys
of FILE.npz that the loader never read are listed as a warning.
"""

import argparse
import functools
import importlib
import json
import math
import pathlib
import sys

import numpy as np
import timm
import torch
from torch import nn

_REPO = pathlib.Path(__file__).resolve().parent.parent
_FIXTURE_DIR = _REPO / 'tests' / 'fixtures' / 'timm'
_INPUT_SHAPE = (2, 32, 32, 3)  # NHWC
_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)

_VIT_ARGS = dict(
    img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4,
    num_classes=7, qkv_bias=True)
_VIT_NOTES = {
    'layer_norm_eps': 1e-6,
    'gelu': 'exact erf (torch.nn.GELU(approximate="none"))',
    'attention_scale': 'head_dim ** -0.5 on q.k (head_dim = 16)',
    'patch_tokens': 'Conv2d stride 8, flatten(2).transpose(1, 2): row-major over (h, w)',
}

# name -> what to build. 'class' and callables in 'kwargs' are resolved by
# _resolve; 'narrow_stem' is a change made after construction (see _narrow_resnet_stem).
SPECS = {
    'vit_tok': {
        'class': 'timm.models.vision_transformer.VisionTransformer',
        'kwargs': dict(_VIT_ARGS, global_pool='token', class_token=True),
        'seed': 0,
        'notes': dict(
            _VIT_NOTES,
            pos_embed='[1, 1 + 16, 48]: cls token concatenated first, then pos_embed added '
                      'to all 17 tokens (no_embed_class=False)',
            head_input='final norm on all tokens, then token 0'),
    },
    'vit_gap': {
        'class': 'timm.models.vision_transformer.VisionTransformer',
        'kwargs': dict(_VIT_ARGS, global_pool='avg', class_token=False, fc_norm=False),
        'seed': 1,
        'notes': dict(
            _VIT_NOTES,
            pos_embed='[1, 16, 48], added to the patch tokens',
            head_input='final norm on all tokens, then mean over tokens (fc_norm=False)'),
    },
    'resnet_bottleneck': {
        'class': 'timm.models.resnet.ResNet',
        'kwargs': dict(
            block={'callable': 'timm.models.resnet.Bottleneck'}, layers=[2, 1, 1, 1],
            channels=[16, 32, 64, 128], stem_width=16, num_classes=7),
        'narrow_stem': 16,
        'seed': 2,
        'notes': {
            'narrow_stem': (
                "timm's ResNet ignores stem_width for the plain 7x7 stem (its width is "
                'fixed at 64), so after construction: conv1 = Conv2d(3, 16, 7, stride 2, '
                'padding 3, bias=False), bn1 = BatchNorm2d(16), layer1.0.conv1 = '
                'Conv2d(16, 16, 1, bias=False), layer1.0.downsample = '
                'timm.models.resnet.downsample_conv(16, 64, 1) (Conv2d 1x1 + BatchNorm2d). '
                'The result is the usual torchvision-layout ResNet with a 16-wide stem.'),
            'batch_norm_eps': 1e-5,
            'stem': '7x7/2 conv padding 3, BN, ReLU, MaxPool2d(3, stride 2, padding 1)',
            'bottleneck': 'stride on the 3x3 conv2 (v1.5); widths 16,32,64,128, outputs x4',
            'head': 'global average pool, fc Linear(512, 7)',
        },
    },
    'bit': {
        'class': 'timm.models.resnetv2.ResNetV2',
        'kwargs': dict(
            layers=[1, 1, 1, 1], channels=[64, 128, 256, 512], stem_chs=16,
            stem_type='fixed', bottle_ratio=0.25, num_classes=7,
            conv_layer={'callable': 'timm.layers.StdConv2d', 'kwargs': {'eps': 1e-8}},
            norm_layer={'callable': 'timm.layers.GroupNormAct',
                        'kwargs': {'num_groups': 8, 'eps': 1e-5}}),
        'seed': 3,
        'notes': {
            'std_conv': 'StdConv2d eps=1e-8: w = (w - mean) / sqrt(var + eps), mean and '
                        'biased var over (in, kh, kw) per output channel',
            'group_norm_eps': 1e-5,
            'group_norm_groups': 8,
            'stem': "stem_type='fixed': StdConv2d 7x7/2 padding 3 (symmetric), "
                    'ConstantPad2d(1, 0.0), MaxPool2d(3, stride 2, padding 0); '
                    'no norm or activation in the stem (pre-activation)',
            'blocks': 'PreActBottleneck: norm1(GN+ReLU) -> conv1 1x1 -> norm2 -> conv2 3x3 '
                      '(stride, padding 1) -> norm3 -> conv3 1x1; shortcut = identity on the '
                      'block input, or downsample.conv (1x1 StdConv2d, stride) on the '
                      'pre-activated input',
            'mid_widths': [16, 32, 64, 128],
            'final_norm': 'norm = GroupNormAct(512) with ReLU before the head',
            'head': 'head.fc is a 1x1 Conv2d(512, 7) with bias after global average pool',
        },
    },
}


# ConvNeXt fixtures: run at 224 and 160 px (a net without position embeddings runs at any size).
# Their input is not stored: it is CONVNEXT_INPUT_SEED's uint8 draw (its sha256 in the config),
# ImageNet-normalised as convnext_input() does; the 160 px input is its top-left crop.
_CONVNEXT_ARGS = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), num_classes=7)
CONVNEXT_SPECS = {
    'convnext': {  # v1 with Linear MLPs, as convnext_tiny and larger
        'class': 'timm.models.convnext.ConvNeXt',
        'kwargs': dict(_CONVNEXT_ARGS, conv_mlp=False),
        'seed': 10,
    },
    'convnext_conv_mlp': {  # v1 with 1x1-conv MLPs, as convnext_atto .. convnext_nano
        'class': 'timm.models.convnext.ConvNeXt',
        'kwargs': dict(_CONVNEXT_ARGS, conv_mlp=True),
        'seed': 11,
    },
    'convnextv2': {  # v2 (GRN, no LayerScale) with Linear MLPs, as convnextv2_tiny and larger
        'class': 'timm.models.convnext.ConvNeXt',
        'kwargs': dict(_CONVNEXT_ARGS, conv_mlp=False, use_grn=True, ls_init_value=None),
        'seed': 12,
    },
    'convnextv2_conv_mlp': {  # v2 with 1x1-conv MLPs, as convnextv2_atto .. convnextv2_nano
        'class': 'timm.models.convnext.ConvNeXt',
        'kwargs': dict(_CONVNEXT_ARGS, conv_mlp=True, use_grn=True, ls_init_value=None),
        'seed': 13,
    },
}
CONVNEXT_NOTES = {
    'layer_norm_eps': 1e-6,
    'gelu': 'exact erf',
    'stem': 'Conv2d 4x4 stride 4 (bias), LayerNorm2d',
    'downsample': 'stages 1-3: LayerNorm2d, Conv2d 2x2 stride 2 (bias)',
    'block': 'conv_dw 7x7 padding 3 groups=C (bias), norm, mlp.fc1, GELU, [mlp.grn], mlp.fc2, '
             '[gamma], + shortcut',
    'grn': 'x + bias + weight * x * (|x|_2 over HW / (mean over C of it + 1e-6))',
    'head': 'mean over HW, head.norm LayerNorm2d, head.fc',
}
CONVNEXT_INPUT_SEED = 10
CONVNEXT_SIZES = (224, 160)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The registered timm names whose parameter counts tests/test_convnext.py compares.
CONVNEXT_NAMES = tuple(
    [f'convnext_{s}' for s in ('atto', 'femto', 'pico', 'nano', 'tiny', 'small', 'base',
                                'large', 'xlarge', 'xxlarge')]
    + [f'convnextv2_{s}' for s in ('atto', 'femto', 'pico', 'nano', 'tiny', 'small', 'base',
                                    'large', 'huge')])


def convnext_input(size: int = CONVNEXT_SIZES[0]) -> tuple[np.ndarray, str]:
  """(ImageNet-normalised float32 NHWC [2, size, size, 3], sha256 of the uint8 draw at 224)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(CONVNEXT_INPUT_SEED)
  u8 = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
  mean, std = np.float32(IMAGENET_MEAN), np.float32(IMAGENET_STD)
  x = (u8.astype(np.float32) / np.float32(255) - mean) / std
  return np.ascontiguousarray(x[:, :size, :size]), hashlib.sha256(u8.tobytes()).hexdigest()


def generate_convnext(out_dir: pathlib.Path) -> None:
  """Writes the CONVNEXT_SPECS fixtures (sd/<key>, logits_<size>, config) and prints timm's
  parameter counts of CONVNEXT_NAMES (built on the meta device: no memory, no init)."""
  out_dir.mkdir(parents=True, exist_ok=True)
  versions = {'timm': timm.__version__, 'torch': torch.__version__, 'numpy': np.__version__}
  for name, spec in CONVNEXT_SPECS.items():
    torch.manual_seed(spec['seed'])
    model = build(spec)
    randomize(model)
    sd = state_dict_arrays(model)
    logits, sha = {}, None
    for size in CONVNEXT_SIZES:
      x, sha = convnext_input(size)
      logits[f'logits_{size}'] = logits_of(model, x)
      check_logits(f'{name} at {size}', logits[f'logits_{size}'])
    config = {
        'name': name, **spec, 'versions': versions, 'notes': CONVNEXT_NOTES,
        'input': {'layout': 'NHWC', 'sizes': list(CONVNEXT_SIZES), 'uint8_sha256': sha,
                  'rng': f'numpy.random.default_rng({CONVNEXT_INPUT_SEED}).integers(0, 256, '
                         '(2, 224, 224, 3), uint8), then (x / 255 - mean) / std in float32 '
                         'with the ImageNet mean and std; smaller sizes crop the top left'},
        'weights': f'torch.manual_seed({spec["seed"]}), model built, then randomize()',
    }
    path = out_dir / f'{name}.npz'
    np.savez_compressed(path, config=np.array(json.dumps(config, indent=1)), **logits,
                        **{f'sd/{k}': v for k, v in sd.items()})
    print(f'{path.relative_to(_REPO) if path.is_relative_to(_REPO) else path}: '
          f'{path.stat().st_size / 1024:.1f} KiB, {len(sd)} tensors')
  print('timm parameter counts (tests/test_convnext.py TIMM_PARAMS):')
  for name in CONVNEXT_NAMES:
    with torch.device('meta'):
      model = timm.create_model(name)
    print(f"    '{name}': {sum(p.numel() for p in model.parameters()):_},")

# ViT backbones (tests/models/test_vit_backbones.py): small random-init configurations of each
# timm family, logits at the default size and at another grid (the position embedding resized
# on load by timm's checkpoint_filter_fn, and for DINOv2 also at run time: dynamic_img_size).
_VIT_SMALL = dict(embed_dim=48, depth=2, num_heads=3, num_classes=7)
_VIT_CLS = 'timm.models.vision_transformer.VisionTransformer'
VIT_BACKBONE_SPECS = {
    'dinov2': dict(kwargs=dict(_VIT_SMALL, img_size=56, patch_size=14, init_values=1e-5),
                   sizes=(56, 84), normalize='imagenet', seed=21, dynamic=True),
    'dinov2_reg4': dict(kwargs=dict(_VIT_SMALL, img_size=56, patch_size=14, init_values=1e-5,
                                    reg_tokens=4, no_embed_class=True),
                        sizes=(56, 84), normalize='imagenet', seed=22, dynamic=True),
    'dinov2_swiglu': dict(kwargs=dict(_VIT_SMALL, img_size=56, patch_size=14, init_values=1e-5,
                                      mlp_ratio=4, act_layer={'callable': 'torch.nn.SiLU'},
                                      mlp_layer={'callable': 'timm.layers.SwiGLUPacked'}),
                          sizes=(56, 42), normalize='imagenet', seed=23, dynamic=True),
    'vit_swiglu_gap': dict(kwargs=dict(_VIT_SMALL, img_size=32, patch_size=8, qkv_bias=False,
                                       global_pool='avg', act_layer={'callable': 'torch.nn.SiLU'},
                                       mlp_layer={'callable': 'timm.layers.SwiGLU'}),
                           sizes=(32, 40), normalize='imagenet', seed=24),
    'siglip': dict(kwargs=dict(_VIT_SMALL, img_size=48, patch_size=8, class_token=False,
                               global_pool='map'),
                   sizes=(48, 32), normalize='siglip', seed=25),
    'siglip_gap': dict(kwargs=dict(_VIT_SMALL, img_size=48, patch_size=8, class_token=False,
                                   global_pool='avg', fc_norm=False, act_layer='gelu_tanh'),
                       sizes=(48, 64), normalize='siglip', seed=26),
    'clip': dict(kwargs=dict(_VIT_SMALL, img_size=32, patch_size=8, pre_norm=True,
                             norm_layer={'callable': 'timm.layers.LayerNorm',
                                         'kwargs': {'eps': 1e-5}}),
                 sizes=(32, 48), normalize='clip', seed=27),
    'clip_quickgelu': dict(kwargs=dict(_VIT_SMALL, img_size=48, patch_size=8, pre_norm=True,
                                       act_layer='quick_gelu',
                                       norm_layer={'callable': 'timm.layers.LayerNorm',
                                                   'kwargs': {'eps': 1e-5}}),
                           sizes=(48, 40), normalize='clip', seed=28),
}
VIT_NORMALIZE = {'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                 'siglip': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                 'clip': ((0.48145466, 0.4578275, 0.40821073),
                          (0.26862954, 0.26130258, 0.27577711))}
# The names whose architecture and parameter count tests/models/test_vit_backbones.py compares
# (tests/fixtures/timm/vit_backbones_table.json): imgcls registers each one.
VIT_TABLE_NAMES = (
    [f'vit_{s}_patch14{r}_dinov2' for s in ('small', 'base', 'large', 'giant')
     for r in ('', '_reg4')]
    + ['vit_base_patch32_siglip_256', 'vit_base_patch32_siglip_gap_256']
    + [f'vit_base_patch16_siglip{g}_{r}' for g in ('', '_gap') for r in (224, 256, 384, 512)]
    + [f'vit_large_patch16_siglip{g}_{r}' for g in ('', '_gap') for r in (256, 384, 512)]
    + [f'vit_so400m_patch14_siglip_{r}' for r in (224, 378, 384)]
    + [f'vit_so400m_patch14_siglip_gap_{r}' for r in (224, 378, 384, 448, 896)]
    + [f'vit_so400m_patch16_siglip{g}_{r}' for g in ('', '_gap') for r in (256, 384, 512)]
    + [f'vit_giantopt_patch16_siglip{g}_{r}' for g in ('', '_gap') for r in (256, 384)]
    + [f'vit_base_patch32_clip_{r}' for r in (224, 256, 384, 448)]
    + ['vit_base_patch16_clip_224', 'vit_base_patch16_clip_384', 'vit_large_patch14_clip_224',
       'vit_large_patch14_clip_336', 'vit_huge_patch14_clip_224', 'vit_huge_patch14_clip_336',
       'vit_huge_patch14_clip_378', 'vit_giant_patch14_clip_224', 'vit_gigantic_patch14_clip_224',
       'vit_gigantic_patch14_clip_378', 'vit_base_patch32_clip_quickgelu_224',
       'vit_base_patch16_clip_quickgelu_224', 'vit_large_patch14_clip_quickgelu_224',
       'vit_large_patch14_clip_quickgelu_336', 'vit_huge_patch14_clip_quickgelu_224',
       'vit_huge_patch14_clip_quickgelu_378', 'vit_gigantic_patch14_clip_quickgelu_224'])
# imgcls's own names for the original papers' sizes -> timm's reference model.
VIT_PAPER_SIZES = {'vit_s32': 'vit_small_patch32_224', 'vit_b8': 'vit_base_patch8_224',
                   'vit_l32': 'vit_large_patch32_224', 'vit_h14': 'vit_huge_patch14_224',
                   'vit_g14': 'vit_giant_patch14_224', 'vit_b16': 'vit_base_patch16_224'}


def vit_input(seed: int, size: int, normalize: str) -> tuple[np.ndarray, str]:
  """(normalised float32 NHWC [2, size, size, 3], sha256 of the uint8 draw at 96 px): the
  top-left crop of one draw, so every size of a fixture sees the same pixels."""
  import hashlib  # pylint: disable=import-outside-toplevel
  u8 = np.random.default_rng(seed).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
  mean, std = (np.float32(v) for v in VIT_NORMALIZE[normalize])
  x = (u8.astype(np.float32) / np.float32(255) - mean) / std
  return np.ascontiguousarray(x[:, :size, :size]), hashlib.sha256(u8.tobytes()).hexdigest()


def _vit_arch(model) -> dict:
  """The architecture facts of a timm VisionTransformer that imgcls's options must reproduce."""
  block = model.blocks[0]
  mlp = block.mlp
  act = type(mlp.act).__name__
  if act == 'GELU' and getattr(mlp.act, 'approximate', 'none') == 'tanh':
    act = 'GELUTanh'
  fc1 = getattr(mlp, 'fc1', None) or mlp.fc1_x
  return {
      'embed_dim': model.embed_dim, 'depth': len(model.blocks),
      'num_heads': block.attn.num_heads, 'mlp_hidden': fc1.out_features,
      'mlp_layer': type(mlp).__name__ + ('Packed' if type(mlp).__name__ == 'GluMlp' else ''),
      'act': act, 'patch_size': model.patch_embed.patch_size[0],
      'img_size': model.patch_embed.img_size[0],
      'class_token': model.cls_token is not None, 'reg_tokens': model.num_reg_tokens,
      'no_embed_class': model.no_embed_class, 'pre_norm': not isinstance(model.norm_pre,
                                                                         nn.Identity),
      'layer_scale': not isinstance(block.ls1, nn.Identity),
      'global_pool': model.global_pool, 'fc_norm': not isinstance(model.fc_norm, nn.Identity),
      'qkv_bias': block.attn.qkv.bias is not None,
      'patch_bias': model.patch_embed.proj.bias is not None,
      'norm_eps': block.norm1.eps,
      'params': sum(p.numel() for p in model.parameters()),
  }


def generate_vit_backbones(out_dir: pathlib.Path) -> None:
  """Writes the VIT_BACKBONE_SPECS fixtures (sd/<key>, logits_<size>, posemb_<size> (timm's
  resized position embedding), logits_dynamic_<size>, config) and the table of architectures
  and parameter counts of VIT_TABLE_NAMES and VIT_PAPER_SIZES (meta device: no memory)."""
  from timm.models.vision_transformer import checkpoint_filter_fn  # pylint: disable=import-outside-toplevel
  out_dir.mkdir(parents=True, exist_ok=True)
  versions = {'timm': timm.__version__, 'torch': torch.__version__, 'numpy': np.__version__}
  for name, spec in VIT_BACKBONE_SPECS.items():
    spec = dict(spec, **{'class': _VIT_CLS})
    torch.manual_seed(spec['seed'])
    model = build(spec)
    randomize(model)
    sd = state_dict_arrays(model)
    arrays, sha = {}, None
    for size in spec['sizes']:
      x, sha = vit_input(spec['seed'], size, spec['normalize'])
      at_size = build(spec, {'img_size': size})
      tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
      at_size.load_state_dict(checkpoint_filter_fn(tsd, at_size))  # resized as timm loads
      arrays[f'logits_{size}'] = logits_of(at_size, x)
      check_logits(f'{name} at {size}', arrays[f'logits_{size}'])
      if size != spec['sizes'][0]:
        arrays[f'posemb_{size}'] = at_size.pos_embed.detach().float().numpy()
        if spec.get('dynamic'):
          dyn = build(spec, {'dynamic_img_size': True})
          dyn.load_state_dict(tsd)
          arrays[f'logits_dynamic_{size}'] = logits_of(dyn, x)
    config = {
        'name': name, **spec, 'versions': versions,
        'arch': {k: v for k, v in _vit_arch(model).items()},
        'input': {'layout': 'NHWC', 'sizes': list(spec['sizes']), 'uint8_sha256': sha,
                  'rng': f'numpy.random.default_rng({spec["seed"]}).integers(0, 256, '
                         f'(2, 96, 96, 3), uint8), (x / 255 - mean) / std in float32 with the '
                         f'{spec["normalize"]} mean and std, top-left crop to each size'},
        'weights': f'torch.manual_seed({spec["seed"]}), model built, then randomize()',
        'resize': 'timm checkpoint_filter_fn onto a model built at the other img_size '
                  '(resample_abs_pos_embed: bicubic, antialias=True, align_corners=False); '
                  'logits_dynamic_*: the default-size model with dynamic_img_size=True',
    }
    path = out_dir / f'vit_{name}.npz' if not name.startswith('vit_') else out_dir / f'{name}.npz'
    np.savez_compressed(path, config=np.array(json.dumps(config, indent=1)), **arrays,
                        **{f'sd/{k}': v for k, v in sd.items()})
    print(f'{path.relative_to(_REPO) if path.is_relative_to(_REPO) else path}: '
          f'{path.stat().st_size / 1024:.1f} KiB, {len(sd)} tensors')
  table = {}
  for name in (*VIT_TABLE_NAMES, *VIT_PAPER_SIZES.values()):
    with torch.device('meta'):
      model = timm.create_model(name, num_classes=1000)
    table[name] = _vit_arch(model)
  path = out_dir / 'vit_backbones_table.json'
  path.write_text(json.dumps({'timm': timm.__version__, 'num_classes': 1000,
                              'imgcls_paper_sizes': VIT_PAPER_SIZES, 'models': table},
                             indent=1) + '\n')
  print(f'{path.name}: {len(table)} models; parameter counts:')
  for name, arch in table.items():
    print(f'  {name}: {arch["params"]:_}')


def _resolve(value):
  """Turns {'callable': 'mod.name', 'kwargs': {...}} into the object (or a partial)."""
  if isinstance(value, dict) and 'callable' in value:
    module, _, name = value['callable'].rpartition('.')
    obj = getattr(importlib.import_module(module), name)
    return functools.partial(obj, **value['kwargs']) if 'kwargs' in value else obj
  return value


def _narrow_resnet_stem(model: nn.Module, width: int) -> None:
  """Gives a timm ResNet a `width`-channel 7x7 stem (see SPECS' note)."""
  from timm.models.resnet import downsample_conv  # pylint: disable=import-outside-toplevel
  first = model.layer1[0]
  model.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
  model.bn1 = nn.BatchNorm2d(width)
  first.conv1 = nn.Conv2d(width, first.conv1.out_channels, 1, bias=False)
  out_chs = first.conv3.out_channels
  first.downsample = downsample_conv(width, out_chs, 1) if width != out_chs else None


def build(spec: dict, overrides: dict | None = None) -> nn.Module:
  """The timm model a spec (or a fixture's config) describes, in eval mode."""
  kwargs = {**spec['kwargs'], **(overrides or {})}
  model = _resolve({'callable': spec['class']})(**{k: _resolve(v) for k, v in kwargs.items()})
  if spec.get('narrow_stem'):
    _narrow_resnet_stem(model, spec['narrow_stem'])
  return model.eval()


@torch.no_grad()
def randomize(model: nn.Module) -> None:
  """Overwrites every parameter and buffer with random values of a sensible scale.

  Norm scales 1 + 0.1 N(0,1), biases and norm shifts 0.1 N(0,1), BN running means
  0.1 N(0,1) and variances U(0.5, 1.5), weight matrices and conv kernels N(0, 1/fan_in),
  other tensors (cls token, position embeddings) 0.2 N(0,1): no tensor stays zero or
  an identity, and activations stay O(1).
  """
  for module in model.modules():
    for name, p in module.named_parameters(recurse=False):
      if isinstance(module, _NORMS):
        p.copy_(1 + 0.1 * torch.randn_like(p) if name == 'weight' else 0.1 * torch.randn_like(p))
      elif name == 'bias':
        p.normal_(0.0, 0.1)
      elif name == 'weight' and p.ndim >= 2:
        p.normal_(0.0, 1 / math.sqrt(math.prod(p.shape[1:])))
      else:
        p.normal_(0.0, 0.2)
    for name, b in module.named_buffers(recurse=False):
      if name == 'running_mean':
        b.normal_(0.0, 0.1)
      elif name == 'running_var':
        b.uniform_(0.5, 1.5)
      elif name != 'num_batches_tracked':
        raise ValueError(f'No rule to randomize buffer {name} of {type(module).__name__}')


def make_input(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(_INPUT_SHAPE).astype(np.float32)


@torch.no_grad()
def logits_of(model: nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
  x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
  return model(x).float().numpy()


def state_dict_arrays(model: nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()
          if not k.endswith('num_batches_tracked')}


def check_logits(name: str, logits: np.ndarray) -> None:
  """Fails unless the logits are finite, varied and O(1)."""
  problems = []
  if not np.isfinite(logits).all():
    problems.append('not finite')
  elif logits.std() < 0.05 or np.abs(logits[0] - logits[1]).max() < 1e-3:
    problems.append(f'nearly constant (std {logits.std():.3g})')
  elif not 0.1 < np.abs(logits).max() < 30:
    problems.append(f'max |logit| {np.abs(logits).max():.3g} is not O(1)')
  if problems:
    raise SystemExit(f'{name}: logits {", ".join(problems)}:\n{logits}')


def generate(out_dir: pathlib.Path) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  versions = {'timm': timm.__version__, 'torch': torch.__version__, 'numpy': np.__version__}
  for name, spec in SPECS.items():
    torch.manual_seed(spec['seed'])
    model = build(spec)
    randomize(model)
    x = make_input(spec['seed'])
    logits = logits_of(model, x)
    check_logits(name, logits)
    sd = state_dict_arrays(model)

    # The fixture must be complete: a fresh model loaded from it gives the same logits.
    fresh = build(spec)
    missing, unexpected = fresh.load_state_dict(
        {k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if missing or unexpected:
      raise SystemExit(f'{name}: state dict round trip: missing {missing}, extra {unexpected}')
    np.testing.assert_array_equal(logits_of(fresh, x), logits)

    config = {
        'name': name, **spec, 'versions': versions,
        'input': {'layout': 'NHWC', 'shape': list(_INPUT_SHAPE),
                  'rng': f'numpy.random.default_rng({spec["seed"]}).standard_normal'},
        'weights': f'torch.manual_seed({spec["seed"]}), model built, then randomize(): '
                   + ' '.join(randomize.__doc__.split('\n\n')[1].split()),
    }
    path = out_dir / f'{name}.npz'
    np.savez_compressed(
        path, input=x, logits=logits, config=np.array(json.dumps(config, indent=1)),
        **{f'sd/{k}': v for k, v in sd.items()})
    n_params = sum(v.size for v in sd.values())
    print(f'{path.relative_to(_REPO) if path.is_relative_to(_REPO) else path}: '
          f'{path.stat().st_size / 1024:.1f} KiB, {len(sd)} tensors, {n_params} values, '
          f'logits std {logits.std():.3f} max|.| {np.abs(logits).max():.3f}')


class _KeyTracker:
  """Wraps an NpzFile and remembers which keys the timm loader read."""

  def __init__(self, npz):
    self._npz = npz
    self.files = npz.files
    self.read = set()

  def __contains__(self, key):
    return key in self._npz.files

  def __getitem__(self, key):
    self.read.add(key)
    return self._npz[key]

  def close(self):
    self._npz.close()


def check_npz(module_name: str, args: argparse.Namespace) -> int:
  """Loads args.file into the fixture's model with timm's .npz loader, compares logits."""
  fixture = pathlib.Path(args.fixture)
  if not fixture.suffix:
    fixture = _FIXTURE_DIR / f'{args.fixture}.npz'
  with np.load(fixture) as f:
    config, x = json.loads(str(f['config'])), f['input']
  model = build(config, json.loads(args.model_args) if args.model_args else None)

  with torch.no_grad():
    for p in model.parameters():
      p.fill_(float('nan'))

  # Read timm's loader's own view of the file to report keys it never used.
  timm_module = importlib.import_module(module_name)
  open_npz = timm_module._load_npz_checkpoint  # pylint: disable=protected-access
  tracker = None

  def tracking_open(*a, **kw):
    nonlocal tracker
    tracker = _KeyTracker(open_npz(*a, **kw))
    return tracker

  timm_module._load_npz_checkpoint = tracking_open  # pylint: disable=protected-access
  try:
    if args.prefix is None:
      model.load_pretrained(str(args.file))
    else:
      model.load_pretrained(str(args.file), prefix=args.prefix)
  except (KeyError, RuntimeError, ValueError) as e:  # a missing key or a wrong shape
    print(f'FAIL: timm could not load {args.file}: {type(e).__name__}: {e}')
    return 1
  finally:
    timm_module._load_npz_checkpoint = open_npz  # pylint: disable=protected-access

  failed = False
  unset = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
  if unset:
    print(f'FAIL: the loader left these parameters unset: {unset}')
    failed = True
  unread = sorted(set(tracker.files) - tracker.read) if tracker else []
  if unread:
    print(f'warning: {len(unread)} keys of {args.file} were not read by timm: {unread}')

  got = logits_of(model, x)
  expected = np.load(args.expected)
  print(f'model: {config["class"]} from {fixture.name}, '
        f'overrides {args.model_args or "none"}; timm {timm.__version__}')
  if got.shape != expected.shape:
    print(f'FAIL: timm logits have shape {got.shape}, expected {expected.shape}')
    return 1
  diff = float(np.abs(got.astype(np.float64) - expected).max())
  print(f'max abs diff: {diff:.3g} (atol {args.atol:g})')
  failed = failed or not diff <= args.atol
  print('FAIL' if failed else 'OK')
  return 1 if failed else 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command')
  gen = sub.add_parser('generate', help='write the fixtures (the default command)')
  gen.add_argument('--out_dir', type=pathlib.Path, default=_FIXTURE_DIR)
  gen_cn = sub.add_parser('generate-convnext', help='write only the ConvNeXt fixtures')
  gen_cn.add_argument('--out_dir', type=pathlib.Path, default=_FIXTURE_DIR)
  gen_vb = sub.add_parser('generate-vit-backbones',
                          help='write only the ViT backbone (DINOv2, SigLIP, CLIP) fixtures')
  gen_vb.add_argument('--out_dir', type=pathlib.Path, default=_FIXTURE_DIR)
  for command, module_name, fixture, prefix_help in [
      ('check-vit-npz', 'timm.models.vision_transformer', 'vit_tok',
       'npz key prefix; default: auto-detected by timm ("", opt/target/, params/, params/img/)'),
      ('check-bit-npz', 'timm.models.resnetv2', 'bit', 'npz key prefix; default: resnet/'),
  ]:
    check = sub.add_parser(command, help=f'load a .npz with {module_name}._load_weights')
    check.set_defaults(module_name=module_name)
    check.add_argument('file', type=pathlib.Path, help='the .npz checkpoint to load')
    check.add_argument('expected', type=pathlib.Path, help='.npy logits for the fixture input')
    check.add_argument('--fixture', default=fixture,
                       help='fixture name in tests/fixtures/timm, or a path to one: its config '
                            f'builds the model and its input is run (default {fixture})')
    check.add_argument('--model_args', default=None,
                       help='JSON object of constructor arguments overriding the config')
    check.add_argument('--prefix', default=None, help=prefix_help)
    check.add_argument('--atol', type=float, default=1e-4)
  args = parser.parse_args(argv)

  if args.command in (None, 'generate'):
    generate(getattr(args, 'out_dir', _FIXTURE_DIR))
    generate_convnext(getattr(args, 'out_dir', _FIXTURE_DIR))
    generate_vit_backbones(getattr(args, 'out_dir', _FIXTURE_DIR))
    return 0
  if args.command == 'generate-convnext':
    generate_convnext(args.out_dir)
    return 0
  if args.command == 'generate-vit-backbones':
    generate_vit_backbones(args.out_dir)
    return 0
  return check_npz(args.module_name, args)


if __name__ == '__main__':
  sys.exit(main())

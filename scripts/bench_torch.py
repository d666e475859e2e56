"""PyTorch + timm side of scripts/benchmark.py: the same model, shape, batch and optimizer.

A worker that scripts/benchmark.py starts under a Python with torch and timm (this one's
when they import, else --torch_python or $IMGCLS_TORCH_PYTHON) and drives over stdin/stdout,
one JSON object per line, so that both frameworks stay warm and their runs interleave
(A B A B) in one window of this noisy machine:

  {"cmd": "setup", "model": "resnet18", "stem": "small", "image_size": 32, "batch": 128,
   "num_classes": 10, "optimizer": "sgd", "lr": 0.1, "weight_decay": 1e-4}
  {"cmd": "train", "steps": 10}      -> {"img_s": ..., "seconds": ...}
  {"cmd": "eval", "steps": 10}       -> {"img_s": ..., "seconds": ...}

It imports neither JAX nor imgcls. torch runs its best CPU setup: channels_last for
convolutional nets (torch's faster layout on CPUs), all cores, float32.
"""

from __future__ import annotations

import json
import os
import sys
import time

import timm
import torch
from torch import nn

TIMM_NAMES = {'resnet18': 'resnet18', 'resnet34': 'resnet34', 'resnet50': 'resnet50',
              'vit_ti16': 'vit_tiny_patch16_224', 'vit_s16': 'vit_small_patch16_224',
              'vit_b16': 'vit_base_patch16_224'}


def build(spec: dict):
  name = spec['model']
  if name not in TIMM_NAMES:
    raise SystemExit(f'bench_torch: no timm model for {name!r}; known: {sorted(TIMM_NAMES)}')
  kwargs = {'num_classes': spec['num_classes']}
  if name.startswith('vit'):
    kwargs['img_size'] = spec['image_size']
  model = timm.create_model(TIMM_NAMES[name], **kwargs)
  conv = name.startswith('resnet')
  if conv and spec.get('stem') in ('small', 'small_s2'):  # imgcls's 3x3 stems, no max-pool
    stride = 1 if spec['stem'] == 'small' else 2
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride, 1, bias=False)
    model.maxpool = nn.Identity()
  if conv and (spec.get('width') or 64) != 64:
    raise SystemExit('bench_torch: timm ResNets have width 64; benchmark those')
  fmt = torch.channels_last if conv else torch.contiguous_format
  model = model.to(memory_format=fmt)
  decay = [p for n, p in model.named_parameters() if p.ndim > 1]
  rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
  groups = [{'params': decay, 'weight_decay': spec['weight_decay']},
            {'params': rest, 'weight_decay': 0.0}]  # imgcls's no_bias_norm mask
  if spec['optimizer'] == 'sgd':
    opt = torch.optim.SGD(groups, lr=spec['lr'], momentum=0.9, nesterov=True)
  else:
    opt = torch.optim.AdamW(groups, lr=spec['lr'])
  gen = torch.Generator().manual_seed(0)
  b, s = spec['batch'], spec['image_size']
  x = torch.randn(b, 3, s, s, generator=gen).contiguous(memory_format=fmt)
  y = torch.randint(0, spec['num_classes'], (b,), generator=gen)
  return model, opt, x, y


def main() -> None:
  torch.set_num_threads(int(os.environ.get('BENCH_THREADS', os.cpu_count() or 1)))
  model = opt = x = y = None
  loss_fn = nn.CrossEntropyLoss()

  def train_step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss

  def eval_step():
    with torch.inference_mode():
      return model(x)

  for line in sys.stdin:
    msg = json.loads(line)
    if msg['cmd'] == 'setup':
      model, opt, x, y = build(msg)
      model.train()
      for _ in range(2):
        train_step()
      reply = {'torch': torch.__version__, 'timm': timm.__version__,
               'threads': torch.get_num_threads(),
               'params': sum(p.numel() for p in model.parameters())}
    elif msg['cmd'] in ('train', 'eval'):
      fn = train_step if msg['cmd'] == 'train' else eval_step
      model.train(msg['cmd'] == 'train')
      fn()  # warm (mode switch)
      t0 = time.perf_counter()
      for _ in range(msg['steps']):
        fn()
      seconds = time.perf_counter() - t0
      reply = {'img_s': msg['steps'] * x.shape[0] / seconds, 'seconds': seconds}
    else:
      reply = {'error': f'unknown cmd {msg["cmd"]!r}'}
    print(json.dumps(reply), flush=True)


if __name__ == '__main__':
  main()

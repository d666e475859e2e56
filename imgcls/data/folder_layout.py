"""Image folders, the part without TensorFlow: names, listing and checks, fingerprints, and the
seeded split of a flat folder. See folder.py for the layouts and how they are prepared."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Sequence

from imgcls.data.base import DataError

PREFIX = 'folder:'
BUILDER_NAME = 'image_folder'
VERSION = '1.0.0'
EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
# Folder name -> split name. Any subset may be present.
SPLIT_FOLDERS = {'train': 'train', 'val': 'validation', 'validation': 'validation',
                 'test': 'test'}
CSV_NAME = 'labels.csv'  # At the root: makes the folder a multi-label dataset.
DEFAULT_SPLIT = 'train=0.8,validation=0.1,test=0.1'
# Bump when the conversion changes, so copies prepared by older code are not reused.
FORMAT = 1
SHOWN = 5  # File names quoted in messages before '...'.


@dataclasses.dataclass(frozen=True)
class File:
  path: str  # Relative to the root, '/'-separated.
  size: int
  mtime_ns: int


@dataclasses.dataclass
class Listing:
  """What is in the root: files per split and class (flat layout: the single split '')."""
  root: str
  layout: str  # 'splits' or 'flat'.
  classes: list[str]
  files: dict[str, dict[str, list[File]]]
  ignored: list[str]  # Files without an image extension.


# ------------------------------------------------------------------ names

def is_folder_name(name: str) -> bool:
  """True for dataset names of the form 'folder:/path/to/root'."""
  return name.strip().startswith(PREFIX)


def root_of(name: str) -> str:
  """'folder:~/data/xrays' -> '/home/me/data/xrays' (absolute, symlinks resolved)."""
  path = name.strip()[len(PREFIX):].strip()
  if not path:
    raise DataError(f'Dataset name {name!r} names no folder: write folder:/path/to/images.')
  return os.path.realpath(os.path.expanduser(path))


def parse_split(spec: str | dict[str, float]) -> dict[str, float]:
  """'train=0.8,validation=0.1,test=0.1' (or a dict) -> {split: fraction}, checked."""
  if isinstance(spec, str):
    pairs = [item.partition('=') for item in spec.split(',') if item.strip()]
    spec_dict = {k.strip(): v for k, sep, v in pairs if sep}
    if len(spec_dict) != len(pairs):
      raise DataError(f'Bad folder split {spec!r}: write split=fraction pairs joined by commas, '
                      f'e.g. {DEFAULT_SPLIT!r}.')
  else:
    spec_dict = dict(spec)
  try:
    out = {SPLIT_FOLDERS.get(k, k): float(v) for k, v in spec_dict.items()}
  except ValueError:
    out = {}
  unknown = sorted(set(out) - set(SPLIT_FOLDERS.values()))
  if unknown or not out or any(f <= 0 for f in out.values()) or abs(sum(out.values()) - 1) > 1e-6:
    raise DataError(f'Bad folder split {spec!r}: splits must be among train, validation (or val) '
                    'and test, with positive fractions that sum to 1, e.g. '
                    f'{DEFAULT_SPLIT!r}.')
  return out


# ---------------------------------------------------------------- listing

def _visible(entries) -> list[os.DirEntry]:
  return sorted((e for e in entries if not e.name.startswith('.')), key=lambda e: e.name)


def _subdirs(path: str) -> list[str]:
  with os.scandir(path) as it:
    return [e.name for e in _visible(it) if e.is_dir()]


def images(root: str, folder: str, ignored: list[str]) -> list[File]:
  """Image files under root/folder, recursively, skipping hidden files and folders."""
  out = []
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    for fname in sorted(f for f in filenames if not f.startswith('.')):
      full = os.path.join(dirpath, fname)
      rel = os.path.relpath(full, root).replace(os.sep, '/')
      if not fname.lower().endswith(EXTENSIONS):
        ignored.append(rel)
        continue
      try:
        st = os.stat(full)
      except OSError:  # A broken link: kept, so the check names it as unreadable.
        out.append(File(rel, -1, -1))
      else:
        out.append(File(rel, st.st_size, st.st_mtime_ns))
  return out


def list_folder(root: str, name: str) -> Listing:
  """Lists the root and checks its shape; every problem found here is a DataError."""
  if not os.path.isdir(root):
    what = 'is not a folder' if os.path.exists(root) else 'does not exist'
    raise DataError(f'Image folder {root} (dataset {name!r}) {what}: fix the path after '
                    f"'{PREFIX}' (layout: ROOT/CLASS/*.jpg or ROOT/train/CLASS/*.jpg).")
  top = _subdirs(root)
  splits = [d for d in top if d in SPLIT_FOLDERS]
  ignored: list[str] = []
  if not splits:
    if not top:
      raise DataError(f'Image folder {root} has no class folders: put the images in '
                      'ROOT/CLASS/*.jpg (or ROOT/train/CLASS/*.jpg, ROOT/test/CLASS/*.jpg), or '
                      f'list them with their labels in ROOT/{CSV_NAME}.')
    files = {'': {c: images(root, c, ignored) for c in top}}
    listing = Listing(root, 'flat', top, files, ignored)
  else:
    others = [d for d in top if d not in SPLIT_FOLDERS]
    if others:
      raise DataError(f'Image folder {root} mixes split folders ({", ".join(splits)}) with other '
                      f'folders ({", ".join(others)}): put every class folder inside a split '
                      'folder, or remove the split folders to have the images split by fractions.')
    if 'val' in splits and 'validation' in splits:
      raise DataError(f'Image folder {root} has both val/ and validation/, which are the same '
                      'split: merge them into one.')
    files = {}
    for folder in splits:
      classes = _subdirs(os.path.join(root, folder))
      if not classes:
        raise DataError(f'Split folder {root}/{folder} has no class folders: put its images in '
                        f'{folder}/CLASS/, or delete it.')
      files[SPLIT_FOLDERS[folder]] = {c: images(root, f'{folder}/{c}', ignored) for c in classes}
    all_classes = sorted(set().union(*files.values()))
    listing = Listing(root, 'splits', all_classes, files, ignored)
  check_classes(listing)
  return listing


def class_path(listing: Listing, split: str, cls: str) -> str:
  """Where a class's images of a split are: ROOT/CLASS/ (flat) or ROOT/SPLIT_FOLDER/CLASS/."""
  if listing.layout == 'flat':
    return f'{listing.root}/{cls}/'
  folders = [f for f, s in SPLIT_FOLDERS.items() if s == split and
             os.path.isdir(os.path.join(listing.root, f))]
  return f'{listing.root}/{folders[0]}/{cls}/'


def check_classes(listing: Listing, after: str = '') -> None:
  """Every class holds images in every split; `after` tells what removed some."""
  empty = [(split, c) for split, per_class in listing.files.items()
           for c in listing.classes if not per_class.get(c)]
  if not empty:
    return
  shown = ', '.join(class_path(listing, s, c) for s, c in empty[:SHOWN])
  more = f' and {len(empty) - SHOWN} more' if len(empty) > SHOWN else ''
  missing = [(s, c) for s, c in empty if c not in listing.files[s]]
  if missing:
    problem = (f'class {missing[0][1]!r} is missing from split {missing[0][0]!r} (every split '
               'must hold every class)')
  else:
    problem = 'class folder(s) without images'
  if listing.layout == 'flat':
    fix = 'add images there, or delete the empty class folder(s)'
  else:
    fix = ('add images there (or move some from another split), or delete the class from '
           'every split')
  raise DataError(
      f'Image folder {listing.root}: {problem}{after}. No images ({"/".join(EXTENSIONS)}) in: '
      f'{shown}{more}. Fix: {fix}.')


# ------------------------------------------------------------- fingerprint

def fingerprint(listing: Listing, split: dict[str, float], seed: int) -> str:
  """Hash of what the prepared copy depends on: files (path, size, mtime) and split settings."""
  h = hashlib.sha256(f'{FORMAT}|{listing.layout}'.encode())
  if listing.layout == 'flat':
    h.update(f'|{sorted(split.items())}|{seed}'.encode())
  for split_name, per_class in sorted(listing.files.items()):
    for c, files in sorted(per_class.items()):
      for f in files:
        h.update(f'\n{split_name}|{c}|{f.path}|{f.size}|{f.mtime_ns}'.encode())
  return h.hexdigest()[:16]


def key_of(root: str, fingerprint: str) -> str:
  """Config name of the prepared copy: readable folder name, path hash, content hash."""
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(root).lower()).strip('_')[:32] or 'root'
  return f'{slug}_{path_hash(root)}_{fingerprint}'


def path_hash(root: str) -> str:
  return hashlib.sha256(root.encode()).hexdigest()[:8]


# ----------------------------------------------------------------- splits

def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
  """n items apportioned by fractions (largest remainder), every share >= 1 if n allows."""
  ideal = [f * n for f in fractions]
  counts = [int(x) for x in ideal]
  order = sorted(range(len(ideal)), key=lambda i: (counts[i] - ideal[i], i))
  for i in order[:n - sum(counts)]:
    counts[i] += 1
  for i in range(len(counts)):
    if counts[i] == 0 and n >= len(counts):
      donor = max(range(len(counts)), key=lambda j: counts[j])
      counts[donor] -= 1
      counts[i] += 1
  return counts


def assign(listing: Listing, split: dict[str, float], seed: int) -> dict[str, dict[str, list]]:
  """Flat layout: each class's files cut into the splits by fractions.

  Files are ordered by a hash of (seed, path) and cut at the apportioned counts: the same
  seed gives the same split, another seed another, each class is split on its own
  (stratified), and adding or removing a file moves at most a few others across a cut,
  rather than reshuffling the whole class (which would mix old test images into training).
  """
  names = list(split)
  out: dict[str, dict[str, list]] = {s: {} for s in names}
  for c in listing.classes:
    files = sorted(listing.files[''][c],
                   key=lambda f: hashlib.sha256(f'{seed}|{f.path}'.encode()).digest())
    if len(files) < len(names):
      raise DataError(
          f'Class {c!r} in {listing.root} has {len(files)} usable image(s), too few to put one '
          f'in each of the splits {", ".join(names)}: add images, or use fewer splits '
          "(dataset.folder_split, e.g. 'train=0.9,test=0.1').")
    start = 0
    for s, n in zip(names, split_counts(len(files), [split[s] for s in names])):
      out[s][c] = files[start:start + n]
      start += n
  return out


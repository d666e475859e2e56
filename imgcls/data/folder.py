"""The user's own images as a TFDS dataset: `dataset.name = 'folder:/path/to/root'`.

Two layouts are read (class names = folder names, sorted; files may sit in subfolders):

  root/train/CLASS/*.jpg, root/val/CLASS/*.png, root/test/...   split folders, any subset
  root/CLASS/*.jpg                                              split here by fractions

`val/` and `validation/` both become the split 'validation' (TFDS's name, as in
imagenet2012), so a config can switch between a folder and a TFDS dataset unchanged.

Multi-label: a file ROOT/labels.csv makes the folder a multi-label dataset, whose records
hold 'labels' (a Sequence of ClassLabel, as in TFDS's voc; turn it into a vector with the
`multihot` pp op) instead of 'label'. The CSV has a header row with the columns `filename`
(relative to the root, '/'-separated) and `labels` (class names separated by ';' or spaces;
may be empty: an image of no class); other columns are ignored:

  filename,labels
  beach/001.jpg,sea;sky;sand
  street/002.png,car person
  empty/003.jpg,

Class names = the sorted union of all labels. Only listed files are read: other images
under the root are ignored (and counted in the log), so a CSV may label a subset; a listed
file that does not exist is an error. If every filename starts with a split folder
(train/, val/, validation/, test/), those are the splits; if none does, the files are split
by dataset.folder_split (seeded, as for the flat layout but not stratified).

The folder is prepared once into data_dir/image_folder/<folder>_<path hash>_<fingerprint>/
as an ordinary prepared TFDS dataset, so train_iterator and eval_data read it exactly like
any other (sub-splits, process parts, exact eval). The fingerprint hashes the file list,
sizes and mtimes (and the split settings), so editing the folder re-prepares it rather than
serving stale data.

Why not `tfds.folder_dataset.ImageFolder`: it reads the original files on every pass and
(in TFDS 4.9) supports no sub-splits ('train[:90%]', hence no tfds.even_splits, so no
multi-process input), only .jpg/.jpeg/.png, no flat layout, and no check of the files; it
also adds a string feature 'image/filename', which the pipeline would reject as undecoded
bytes. So this module lists and checks the files itself and writes them with a small
GeneratorBasedBuilder; the result needs no code to read (tfds.builder_from_directory).

Every image reaches the pipeline as 3-channel RGB in JPEG or PNG, at its own size (resizing
is the pp string's job):
- an RGB JPEG or PNG without EXIF rotation or transparency keeps its bytes (no generation
  loss, small files, no work);
- everything else (BMP, GIF, WebP; grayscale, palette, CMYK, 16-bit, RGBA; rotated) is
  converted to RGB with PIL and stored as lossless PNG. Transparent images (RGBA, LA,
  palette with transparency) are composited on white: dropping alpha would show whatever
  colour the transparent pixels happen to store (often black). EXIF rotation is applied
  because TF's decoders ignore it. Animated GIF/WebP keep their first frame.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import os
import posixpath
import re
import stat
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image, ImageOps

from imgcls.data import sources
from imgcls.data.sources import DataError

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
_FORMAT = 1
_SHOWN = 5  # File names quoted in messages before '...'.


@dataclasses.dataclass(frozen=True)
class _File:
  path: str  # Relative to the root, '/'-separated.
  size: int
  mtime_ns: int


@dataclasses.dataclass
class _Listing:
  """What is in the root: files per split and class (flat layout: the single split '')."""
  root: str
  layout: str  # 'splits' or 'flat'.
  classes: list[str]
  files: dict[str, dict[str, list[_File]]]
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


def _images(root: str, folder: str, ignored: list[str]) -> list[_File]:
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
        out.append(_File(rel, -1, -1))
      else:
        out.append(_File(rel, st.st_size, st.st_mtime_ns))
  return out


def _list(root: str, name: str) -> _Listing:
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
    files = {'': {c: _images(root, c, ignored) for c in top}}
    listing = _Listing(root, 'flat', top, files, ignored)
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
      files[SPLIT_FOLDERS[folder]] = {c: _images(root, f'{folder}/{c}', ignored) for c in classes}
    all_classes = sorted(set().union(*files.values()))
    listing = _Listing(root, 'splits', all_classes, files, ignored)
  _check_classes(listing)
  return listing


def _split_folder(listing: _Listing, split: str) -> str:
  if listing.layout == 'flat':
    return listing.root
  names = [f for f, s in SPLIT_FOLDERS.items() if s == split and
           os.path.isdir(os.path.join(listing.root, f))]
  return f'{listing.root}/{names[0]}'


def _check_classes(listing: _Listing, after: str = '') -> None:
  """Every class holds images in every split; `after` tells what removed some."""
  empty = [(split, c) for split, per_class in listing.files.items()
           for c in listing.classes if not per_class.get(c)]
  if not empty:
    return
  shown = ', '.join(f'{_split_folder(listing, s)}/{c}' for s, c in empty[:_SHOWN])
  more = f' and {len(empty) - _SHOWN} more' if len(empty) > _SHOWN else ''
  missing = [(s, c) for s, c in empty if c not in listing.files[s]]
  if missing:
    problem = (f'class {missing[0][1]!r} is missing from split {missing[0][0]!r} (every split '
               'must hold every class)')
  else:
    problem = 'class folder(s) without images'
  raise DataError(
      f'Image folder {listing.root}: {problem}{after}. No images ({"/".join(EXTENSIONS)}) in: '
      f'{shown}{more}. Fix: add images there (or move some from another split), or delete the '
      'class everywhere.')


# ------------------------------------------------------------- fingerprint

def _fingerprint(listing: _Listing, split: dict[str, float], seed: int) -> str:
  """Hash of what the prepared copy depends on: files (path, size, mtime) and split settings."""
  h = hashlib.sha256(f'{_FORMAT}|{listing.layout}'.encode())
  if listing.layout == 'flat':
    h.update(f'|{sorted(split.items())}|{seed}'.encode())
  for split_name, per_class in sorted(listing.files.items()):
    for c, files in sorted(per_class.items()):
      for f in files:
        h.update(f'\n{split_name}|{c}|{f.path}|{f.size}|{f.mtime_ns}'.encode())
  return h.hexdigest()[:16]


def _key(root: str, fingerprint: str) -> str:
  """Config name of the prepared copy: readable folder name, path hash, content hash."""
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(root).lower()).strip('_')[:32] or 'root'
  return f'{slug}_{_path_hash(root)}_{fingerprint}'


def _path_hash(root: str) -> str:
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


def _assign(listing: _Listing, split: dict[str, float], seed: int) -> dict[str, dict[str, list]]:
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


# -------------------------------------------------------------- labels.csv

@dataclasses.dataclass
class _CsvListing:
  """The files labels.csv lists, with their labels, per split ('': split by fractions)."""
  root: str
  classes: list[str]
  files: dict[str, list[tuple[_File, tuple[str, ...]]]]
  digest: str  # sha256 of labels.csv: a label edit alone must re-prepare.
  unlisted: list[str]  # Images under the root that labels.csv does not list.


def parse_labels(text: str) -> tuple[str, ...]:
  """'cat; dog cat' -> ('cat', 'dog'): names split at ';' or whitespace, sorted, distinct."""
  return tuple(sorted(set(re.split(r'[;\s]+', text.strip())) - {''}))


def _read_csv(path: str) -> tuple[list[tuple[str, tuple[str, ...]]], bytes]:
  """(filename, labels) of each row of labels.csv, checked, and the file's bytes."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    text = raw.decode('utf-8-sig')  # Spreadsheets often write a byte-order mark.
  except UnicodeDecodeError as e:
    raise DataError(f'{path} is not UTF-8 text ({e}): save it as UTF-8 CSV.') from None
  example = 'e.g.\n  filename,labels\n  images/001.jpg,cat;dog\n  images/002.jpg,'
  reader = csv.reader(io.StringIO(text, newline=''))
  header = [h.strip().lower() for h in next(reader, [])]
  if 'filename' not in header or 'labels' not in header:
    raise DataError(f'{path} needs a header row naming the columns filename and labels (found '
                    f'{header or "an empty file"}), {example}')
  name_col, labels_col = header.index('filename'), header.index('labels')
  rows, lines = [], {}
  for row in reader:
    if not any(cell.strip() for cell in row):
      continue
    name = row[name_col].strip() if name_col < len(row) else ''
    rel = posixpath.normpath(name.replace('\\', '/'))
    if not name or rel.startswith('/') or rel == '..' or rel.startswith('../'):
      raise DataError(f'{path} line {reader.line_num}: filename {name!r} must be a path relative '
                      'to the folder holding labels.csv, and inside it.')
    if rel in lines:
      raise DataError(f'{path} lists {rel} twice (lines {lines[rel]} and {reader.line_num}): '
                      'keep one row per image, with all its labels.')
    lines[rel] = reader.line_num
    rows.append((rel, parse_labels(row[labels_col]) if labels_col < len(row) else ()))
  if not rows:
    raise DataError(f'{path} lists no images: add one row per image, {example}')
  return rows, raw


def _list_csv(root: str) -> _CsvListing:
  """The images labels.csv lists, checked; every problem found here is a DataError."""
  path = os.path.join(root, CSV_NAME)
  rows, raw = _read_csv(path)
  files, missing = [], []
  for rel, labels in rows:
    try:
      st = os.stat(os.path.join(root, rel))
    except OSError:
      st = None
    if st is None or not stat.S_ISREG(st.st_mode):
      missing.append(rel)
    else:
      files.append((_File(rel, st.st_size, st.st_mtime_ns), labels))
  if missing:
    more = f' and {len(missing) - _SHOWN} more' if len(missing) > _SHOWN else ''
    raise DataError(f'{len(missing)} file(s) listed in {path} do not exist: '
                    f'{", ".join(missing[:_SHOWN])}{more}. Fix the filename column (paths are '
                    f'relative to {root}), or remove those rows.')
  classes = sorted(set().union(*(labels for _, labels in rows)))
  if not classes:
    raise DataError(f'{path} gives no labels at all: fill the labels column (class names '
                    "separated by ';' or spaces).")
  in_split = [rel.split('/', 1)[0] in SPLIT_FOLDERS and '/' in rel for rel, _ in rows]
  if all(in_split):
    used = {rel.split('/', 1)[0] for rel, _ in rows}
    if {'val', 'validation'} <= used:
      raise DataError(f'{path} lists files under both val/ and validation/, which are the same '
                      'split: use one.')
    by_split: dict[str, list] = {}
    for item in files:
      by_split.setdefault(SPLIT_FOLDERS[item[0].path.split('/', 1)[0]], []).append(item)
  elif any(in_split):
    inside = [rel for (rel, _), s in zip(rows, in_split) if s][:2]
    outside = [rel for (rel, _), s in zip(rows, in_split) if not s][:2]
    raise DataError(f'{path} lists files in split folders ({", ".join(inside)}, ...) and files '
                    f'outside them ({", ".join(outside)}, ...): put every file in train/, val/ '
                    'or test/, or none to have them split by dataset.folder_split.')
  else:
    by_split = {'': files}
  listed = {rel for rel, _ in rows}
  unlisted = [f.path for f in _images(root, '', []) if f.path not in listed]
  return _CsvListing(root, classes, by_split, hashlib.sha256(raw).hexdigest(), unlisted)


def _csv_fingerprint(listing: _CsvListing, split: dict[str, float], seed: int) -> str:
  """Hash of what the prepared copy depends on: the CSV, the files, the split settings."""
  h = hashlib.sha256(f'{_FORMAT}|csv|{listing.digest}'.encode())
  if '' in listing.files:
    h.update(f'|{sorted(split.items())}|{seed}'.encode())
  for split_name, items in sorted(listing.files.items()):
    for f, _ in items:
      h.update(f'\n{split_name}|{f.path}|{f.size}|{f.mtime_ns}'.encode())
  return h.hexdigest()[:16]


def _assign_csv(root: str, items: list, split: dict[str, float], seed: int) -> dict[str, list]:
  """Listed files not in split folders, cut into the splits by fractions (hash order, as
  `_assign`, but over all files at once: a multi-label set has no classes to stratify by)."""
  names = list(split)
  items = sorted(items, key=lambda it: hashlib.sha256(f'{seed}|{it[0].path}'.encode()).digest())
  if len(items) < len(names):
    raise DataError(f'Image folder {root} has {len(items)} usable image(s) in {CSV_NAME}, too '
                    f'few to put one in each of the splits {", ".join(names)}: add images, or '
                    "use fewer splits (dataset.folder_split, e.g. 'train=0.9,test=0.1').")
  out, start = {}, 0
  for s, n in zip(names, split_counts(len(items), [split[s] for s in names])):
    out[s], start = items[start:start + n], start + n
  return out


# ------------------------------------------------------------- conversion

def _to_rgb(image: Image.Image) -> Image.Image:
  """PIL image of any mode -> RGB; transparency composited on white."""
  if image.mode == 'P':
    image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
  if image.mode.startswith('I'):  # 16-bit grayscale PNG: keep the top 8 bits, not clip.
    image = Image.fromarray((np.asarray(image, np.uint32) >> 8).astype(np.uint8))
  if image.mode in ('RGBA', 'LA', 'PA'):
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert('RGB')
  return image.convert('RGB')


def _encode(path: str) -> bytes:
  """The image's bytes for the dataset: RGB JPEG and PNG as they are, the rest as RGB PNG."""
  with open(path, 'rb') as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as image:
    image.load()  # Decodes everything: corrupt and truncated files fail here.
    rotated = image.getexif().get(0x0112, 1) not in (0, 1)  # EXIF orientation.
    # An RGB PNG with a transparent colour (tRNS) may decode to 4 channels in TF: convert it.
    if (image.format in ('JPEG', 'PNG') and image.mode == 'RGB' and not rotated and
        'transparency' not in image.info):
      return data
    image = _to_rgb(ImageOps.exif_transpose(image) if rotated else image)
  out = io.BytesIO()
  image.save(out, format='PNG')
  return out.getvalue()


def _problem(path: str) -> str | None:
  """None if the file decodes fully, else why not."""
  try:
    with Image.open(path) as image:
      image.load()
  except Image.DecompressionBombError as e:
    return f'too large for PIL\'s safety limit ({e}); downscale it'
  except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
    return str(e) or type(e).__name__
  return None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  # PIL releases the GIL while decoding and encoding, so threads use several cores.
  return concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def _bad_files(root: str, files: list[_File]) -> list[tuple[str, str]]:
  """(path, reason) of every file PIL cannot decode."""
  with _pool() as pool:
    problems = pool.map(_problem, [os.path.join(root, f.path) for f in files])
    return [(f.path, p) for f, p in zip(files, problems) if p]


def _bad_error(root: str, bad: Sequence[tuple[str, str]]) -> DataError:
  shown = '\n'.join(f'  {root}/{p}: {why}' for p, why in bad[:_SHOWN])
  more = f'\n  ... and {len(bad) - _SHOWN} more' if len(bad) > _SHOWN else ''
  return DataError(
      f'{len(bad)} file(s) in image folder {root} are not readable images (corrupt, truncated or '
      f'not an image):\n{shown}{more}\nFix: delete or replace them, or set '
      '--config.dataset.skip_corrupt=true to leave them out (they are counted in the log).')


def _warn_skipped(root: str, skipped: Sequence[str]) -> None:
  more = ', ...' if len(skipped) > _SHOWN else ''
  logging.warning('Image folder %s: skipped %d unreadable image file(s) (skip_corrupt=True): '
                  '%s%s', root, len(skipped), ', '.join(skipped[:_SHOWN]), more)


# ---------------------------------------------------------------- builder

class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes a checked file plan ({split: {class: files}}) as a TFDS dataset."""

  name = BUILDER_NAME
  LABEL_KEY = 'label'
  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): 'Images from a folder, RGB, JPEG or PNG, original sizes.'}

  def __init__(self, *, root: str, classes: list[str], plan: dict[str, dict[str, list[_File]]],
               key: str, data_dir: str, metadata: dict):
    self._root, self._classes, self._plan, self._metadata = root, classes, plan, metadata
    super().__init__(data_dir=data_dir, config=tfds.core.BuilderConfig(
        name=key, description=f'Images from {root}'))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Image classification dataset prepared from the folder {self._root}.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            self.LABEL_KEY: self._label_feature(),
        }),
        supervised_keys=('image', self.LABEL_KEY),
        # Saved with dataset_info.json, inside TFDS's atomic write of the copy.
        metadata=tfds.core.MetadataDict(self._metadata))

  def _label_feature(self) -> tfds.features.FeatureConnector:
    return tfds.features.ClassLabel(names=self._classes)

  def _items(self, part) -> list[tuple[str, Any]]:
    """(path, label) of each file in one split of the plan."""
    return [(f.path, c) for c in sorted(part) for f in part[c]]

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(part) for split, part in self._plan.items()}

  def _generate_examples(self, part) -> Iterator:
    items = self._items(part)
    chunk = 256  # Bounds the encoded images held in memory at once.
    with _pool() as pool:
      for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        encoded = pool.map(_encode, [os.path.join(self._root, p) for p, _ in part])
        for (path, c), data in zip(part, encoded):
          # Key = the path: TFDS orders records by its hash, so classes come mixed.
          yield path, {'image': data, self.LABEL_KEY: c}


class _MultiLabelBuilder(_Builder, skip_registration=True):
  """Writes a checked plan ({split: [(file, label names)]}) with a multi-label 'labels'."""

  name = BUILDER_NAME  # TFDS names each subclass after itself otherwise.
  LABEL_KEY = 'labels'

  def _label_feature(self) -> tfds.features.FeatureConnector:
    return tfds.features.Sequence(tfds.features.ClassLabel(names=self._classes))

  def _items(self, part) -> list[tuple[str, Any]]:
    return [(f.path, list(labels)) for f, labels in part]


# ------------------------------------------------------------------ public

def _stale_copies(data_dir: str, key: str) -> list[str]:
  """Other prepared copies of the same folder (same path hash, other fingerprint)."""
  base = epath.Path(data_dir) / BUILDER_NAME
  prefix = key.rsplit('_', 1)[0] + '_'
  if not base.exists():
    return []
  return sorted(str(p) for p in base.iterdir() if p.name.startswith(prefix) and p.name != key)


def get_builder(name: str, data_dir: str | None = None, *, prepare: bool = True,
                skip_corrupt: bool = False, split: str | dict[str, float] = DEFAULT_SPLIT,
                seed: int = 0) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for 'folder:/root'; prepares it first if the folder changed.

  A ROOT/labels.csv makes it multi-label (see the module doc).
  skip_corrupt: leave out (and log) files that do not decode instead of failing.
  split, seed: fractions and seed of the split of a flat ROOT/CLASS/ folder (per class), or
    of the files a labels.csv lists outside split folders.
  """
  data_dir = sources.default_data_dir(data_dir)
  root = root_of(name)
  prepare_fn: Callable[[], None]
  if os.path.isfile(os.path.join(root, CSV_NAME)):
    csv_listing = _list_csv(root)
    if csv_listing.unlisted:
      more = ', ...' if len(csv_listing.unlisted) > _SHOWN else ''
      logging.warning('Image folder %s: ignored %d image(s) not listed in %s: %s%s', root,
                      len(csv_listing.unlisted), CSV_NAME,
                      ', '.join(csv_listing.unlisted[:_SHOWN]), more)
    fractions = parse_split(split)
    key = _key(root, _csv_fingerprint(csv_listing, fractions, seed))
    prepare_fn = lambda: _prepare_csv(csv_listing, key, data_dir, skip_corrupt, fractions, seed)
  else:
    listing = _list(root, name)
    if listing.ignored:
      more = ', ...' if len(listing.ignored) > _SHOWN else ''
      logging.warning('Image folder %s: ignored %d file(s) without an image extension (%s): '
                      '%s%s', root, len(listing.ignored), ', '.join(EXTENSIONS),
                      ', '.join(listing.ignored[:_SHOWN]), more)
    fractions = parse_split(split)
    key = _key(root, _fingerprint(listing, fractions, seed))
    prepare_fn = lambda: _prepare(listing, key, data_dir, skip_corrupt, fractions, seed)
  builder_dir = epath.Path(data_dir) / BUILDER_NAME / key / VERSION
  if not (builder_dir / 'dataset_info.json').exists():
    if not prepare:
      raise DataError(
          f'Image folder {root} is not prepared in {data_dir} (or changed since it was): run '
          f'`imgcls prepare {PREFIX}{root} --data_dir={data_dir}`, or allow dataset.prepare.')
    prepare_fn()
  builder = tfds.builder_from_directory(builder_dir)
  skipped = skipped_files(builder)
  if skipped and not skip_corrupt:
    raise _bad_error(root, [(p, 'left out when this copy was prepared with skip_corrupt')
                            for p in skipped])
  if skipped:
    _warn_skipped(root, skipped)
  return builder


def _prepare(listing: _Listing, key: str, data_dir: str, skip_corrupt: bool,
             fractions: dict[str, float], seed: int) -> None:
  root = listing.root
  count = sum(len(f) for per_class in listing.files.values() for f in per_class.values())
  logging.info('Preparing image folder %s (%d images) into %s/%s/%s.', root, count, data_dir,
               BUILDER_NAME, key)
  everything = [f for per_class in listing.files.values() for fs in per_class.values() for f in fs]
  bad = _bad_files(root, everything)
  if bad and not skip_corrupt:
    raise _bad_error(root, bad)
  if bad:
    bad_paths = {p for p, _ in bad}
    listing.files = {s: {c: [f for f in fs if f.path not in bad_paths] for c, fs in pc.items()}
                     for s, pc in listing.files.items()}
    _check_classes(listing, after=' once the unreadable files are skipped')
  plan = _assign(listing, fractions, seed) if listing.layout == 'flat' else listing.files
  metadata = {'root': root, 'layout': listing.layout, 'skipped': sorted(p for p, _ in bad)}
  if listing.layout == 'flat':
    metadata.update(split=fractions, seed=seed)
  _write(_Builder(root=root, classes=listing.classes, plan=plan, key=key, data_dir=data_dir,
                  metadata=metadata), root, key, data_dir)


def _prepare_csv(listing: _CsvListing, key: str, data_dir: str, skip_corrupt: bool,
                 fractions: dict[str, float], seed: int) -> None:
  root = listing.root
  everything = [f for items in listing.files.values() for f, _ in items]
  logging.info('Preparing multi-label image folder %s (%d images listed in %s) into %s/%s/%s.',
               root, len(everything), CSV_NAME, data_dir, BUILDER_NAME, key)
  bad = _bad_files(root, everything)
  if bad and not skip_corrupt:
    raise _bad_error(root, bad)
  bad_paths = {p for p, _ in bad}
  files = {s: [it for it in items if it[0].path not in bad_paths]
           for s, items in listing.files.items()}
  empty = sorted(s or 'all' for s, items in files.items() if not items)
  if empty:
    raise DataError(f'Image folder {root}: no readable image left in split(s) {", ".join(empty)} '
                    'once the unreadable files are skipped. Fix: replace the unreadable files.')
  plan = _assign_csv(root, files[''], fractions, seed) if '' in files else files
  metadata = {'root': root, 'layout': 'csv', 'skipped': sorted(bad_paths)}
  if '' in files:
    metadata.update(split=fractions, seed=seed)
  _write(_MultiLabelBuilder(root=root, classes=listing.classes, plan=plan, key=key,
                            data_dir=data_dir, metadata=metadata), root, key, data_dir)


def _write(builder: _Builder, root: str, key: str, data_dir: str) -> None:
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  stale = _stale_copies(data_dir, key)
  if stale:
    logging.warning('Image folder %s changed since it was last prepared; older copies remain '
                    '(delete them when no run reads them): %s', root, ', '.join(stale))


def skipped_files(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Paths (relative to the root) left out of a prepared folder dataset as unreadable."""
  metadata = builder.info.metadata or {}
  return list(metadata.get('skipped', []))

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
is the pp string's job): an RGB JPEG or PNG without EXIF rotation or transparency keeps its
bytes; everything else is converted to RGB by decode.py and stored as lossless PNG.

Evaluation split: a folder may have no 'validation' split (ROOT/{train,test}/CLASS, or a
folder_split without one); `eval_split(name, folder_split)` tells which split to evaluate
on without preparing anything: 'validation' if the folder will have one, else 'test'.

Modules: folder_layout.py (listing, checks, flat split), folder_csv.py (labels.csv),
decode.py (image conversion), folder_write.py (the TFDS builders; imports TensorFlow, so it
is loaded only to prepare). This one is the source 'folder' and ties them together.
"""

from __future__ import annotations

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from absl import logging
from etils import epath

from imgcls.data import folder_csv, folder_layout
from imgcls.data.base import register_source, DataError, default_data_dir
from imgcls.data.folder_csv import parse_labels  # noqa: F401  (public)
from imgcls.data.folder_layout import (BUILDER_NAME, CSV_NAME, DEFAULT_SPLIT,  # noqa: F401
                                       EXTENSIONS, PREFIX, SHOWN, SPLIT_FOLDERS, VERSION,
                                       is_folder_name, parse_split, root_of, split_counts)
from imgcls.registry import lazy_import

tfds = lazy_import('tensorflow_datasets')
folder_write = lazy_import('imgcls.data.folder_write')


def bad_error(root: str, bad: Sequence[tuple[str, str]]) -> DataError:
  shown = '\n'.join(f'  {root}/{p}: {why}' for p, why in bad[:SHOWN])
  more = f'\n  ... and {len(bad) - SHOWN} more' if len(bad) > SHOWN else ''
  return DataError(
      f'{len(bad)} file(s) in image folder {root} are not readable images (corrupt, truncated or '
      f'not an image):\n{shown}{more}\nFix: delete or replace them, or leave them out (they '
      'are counted in the log) with --config.dataset.skip_corrupt=True, on `imgcls train` as '
      'on `imgcls prepare --config=CONFIG` (in Python: skip_corrupt=True).')


def _warn_skipped(root: str, skipped: Sequence[str]) -> None:
  more = ', ...' if len(skipped) > SHOWN else ''
  logging.warning('Image folder %s: skipped %d unreadable image file(s) (skip_corrupt=True): '
                  '%s%s', root, len(skipped), ', '.join(skipped[:SHOWN]), more)


# ------------------------------------------------------------------ public

def get_builder(name: str, data_dir: str | None = None, *, prepare: bool = True,
                skip_corrupt: bool = False, split: str | dict[str, float] = DEFAULT_SPLIT,
                seed: int = 0) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for 'folder:/root'; prepares it first if the folder changed.

  A ROOT/labels.csv makes it multi-label (see the module doc).
  skip_corrupt: leave out (and log) files that do not decode instead of failing.
  split, seed: fractions and seed of the split of a flat ROOT/CLASS/ folder (per class), or
    of the files a labels.csv lists outside split folders.
  """
  data_dir = default_data_dir(data_dir)
  root = root_of(name)
  prepare_fn: Callable[[], None]
  if os.path.isfile(os.path.join(root, CSV_NAME)):
    csv_listing = folder_csv.list_csv(root)
    if csv_listing.unlisted:
      more = ', ...' if len(csv_listing.unlisted) > SHOWN else ''
      logging.warning('Image folder %s: ignored %d image(s) not listed in %s: %s%s', root,
                      len(csv_listing.unlisted), CSV_NAME,
                      ', '.join(csv_listing.unlisted[:SHOWN]), more)
    fractions = parse_split(split)
    key = folder_layout.key_of(root, folder_csv.csv_fingerprint(csv_listing, fractions, seed))
    prepare_fn = lambda: _prepare_csv(csv_listing, key, data_dir, skip_corrupt, fractions, seed)
  else:
    listing = folder_layout.list_folder(root, name)
    if listing.ignored:
      more = ', ...' if len(listing.ignored) > SHOWN else ''
      logging.warning('Image folder %s: ignored %d file(s) without an image extension (%s): '
                      '%s%s', root, len(listing.ignored), ', '.join(EXTENSIONS),
                      ', '.join(listing.ignored[:SHOWN]), more)
    fractions = parse_split(split)
    key = folder_layout.key_of(root, folder_layout.fingerprint(listing, fractions, seed))
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
    raise bad_error(root, [(p, 'left out when this copy was prepared with skip_corrupt')
                            for p in skipped])
  if skipped:
    _warn_skipped(root, skipped)
  return builder


def _prepare(listing: folder_layout.Listing, key: str, data_dir: str, skip_corrupt: bool,
             fractions: dict[str, float], seed: int) -> None:
  root = listing.root
  count = sum(len(f) for per_class in listing.files.values() for f in per_class.values())
  logging.info('Preparing image folder %s (%d images) into %s/%s/%s.', root, count, data_dir,
               BUILDER_NAME, key)
  everything = [f for per_class in listing.files.values() for fs in per_class.values() for f in fs]
  bad = folder_write.bad_files(root, everything)
  if bad and not skip_corrupt:
    raise bad_error(root, bad)
  if bad:
    bad_paths = {p for p, _ in bad}
    listing.files = {s: {c: [f for f in fs if f.path not in bad_paths] for c, fs in pc.items()}
                     for s, pc in listing.files.items()}
    folder_layout.check_classes(listing, after=' once the unreadable files are skipped')
  flat = listing.layout == 'flat'
  plan = folder_layout.assign(listing, fractions, seed) if flat else listing.files
  metadata = {'root': root, 'layout': listing.layout, 'skipped': sorted(p for p, _ in bad)}
  if listing.layout == 'flat':
    metadata.update(split=fractions, seed=seed)
  builder = folder_write.Builder(root=root, classes=listing.classes, plan=plan, key=key,
                                 data_dir=data_dir, metadata=metadata)
  folder_write.write(builder, root, key, data_dir)


def _prepare_csv(listing: folder_csv.CsvListing, key: str, data_dir: str, skip_corrupt: bool,
                 fractions: dict[str, float], seed: int) -> None:
  root = listing.root
  everything = [f for items in listing.files.values() for f, _ in items]
  logging.info('Preparing multi-label image folder %s (%d images listed in %s) into %s/%s/%s.',
               root, len(everything), CSV_NAME, data_dir, BUILDER_NAME, key)
  bad = folder_write.bad_files(root, everything)
  if bad and not skip_corrupt:
    raise bad_error(root, bad)
  bad_paths = {p for p, _ in bad}
  files = {s: [it for it in items if it[0].path not in bad_paths]
           for s, items in listing.files.items()}
  empty = sorted(s or 'all' for s, items in files.items() if not items)
  if empty:
    raise DataError(f'Image folder {root}: no readable image left in split(s) {", ".join(empty)} '
                    'once the unreadable files are skipped. Fix: replace the unreadable files.')
  plan = folder_csv.assign_csv(root, files[''], fractions, seed) if '' in files else files
  metadata = {'root': root, 'layout': 'csv', 'skipped': sorted(bad_paths)}
  if '' in files:
    metadata.update(split=fractions, seed=seed)
  builder = folder_write.MultiLabelBuilder(root=root, classes=listing.classes, plan=plan,
                                           key=key, data_dir=data_dir, metadata=metadata)
  folder_write.write(builder, root, key, data_dir)


def skipped_files(builder: Any) -> list[str]:
  """Paths (relative to the root) left out of a prepared folder dataset as unreadable."""
  metadata = builder.info.metadata or {}
  return list(metadata.get('skipped', []))


def splits(name: str, split: str | dict[str, float] = DEFAULT_SPLIT) -> list[str] | None:
  """The splits the folder's dataset will have, from a quick look (nothing is prepared or
  decoded); None if the folder cannot be read as a dataset (get_builder says why)."""
  try:
    root = root_of(name)
    if os.path.isfile(os.path.join(root, CSV_NAME)):
      rows, _ = folder_csv.read_csv(os.path.join(root, CSV_NAME))
      tops = {rel.split('/', 1)[0] for rel, _ in rows if '/' in rel}
      if tops <= set(SPLIT_FOLDERS) and all('/' in rel for rel, _ in rows):
        return sorted({SPLIT_FOLDERS[t] for t in tops})
      return sorted(parse_split(split))
    listing = folder_layout.list_folder(root, name)
  except (DataError, OSError):
    return None
  return sorted(parse_split(split)) if listing.layout == 'flat' else sorted(listing.files)


def eval_split(name: str, split: str | dict[str, float] = DEFAULT_SPLIT) -> str:
  """The split to evaluate a folder dataset on: 'validation' if it will have one, else 'test'
  (ROOT/{train,test}/CLASS, or a folder_split without validation). 'validation' when the
  folder cannot be read yet: building it reports the problem."""
  found = splits(name, split)
  if found is None or 'validation' in found or 'test' not in found:
    return 'validation'
  logging.info('Image folder %s has no validation split: evaluating on test.', root_of(name))
  return 'test'


# ------------------------------------------------------------------ source

class FolderSource:
  """The dataset source for 'folder:/path/to/images' names (registered as 'folder')."""

  names: tuple[str, ...] = ()
  prefix = PREFIX
  fallback = False

  def builder(self, name: str, data_dir: str, *, prepare: bool = True,
              skip_corrupt: bool = False, folder_split: str = DEFAULT_SPLIT,
              folder_seed: int = 0, **options: Any):
    del options
    return get_builder(name, data_dir, prepare=prepare, skip_corrupt=skip_corrupt,
                       split=folder_split, seed=folder_seed)

  def prepare(self, name: str, data_dir: str, manual_dir: str | None = None, **options: Any):
    del manual_dir  # The folder is the source.
    return self.builder(name, data_dir, prepare=True, **options)


register_source('folder', FolderSource())

"""Multi-label image folders: ROOT/labels.csv read, checked and split (see folder.py)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import posixpath
import re
import stat

from imgcls.data.base import DataError
from imgcls.data.folder_layout import (CSV_NAME, FORMAT, SHOWN, SPLIT_FOLDERS, File, images,
                                       split_counts)


@dataclasses.dataclass
class CsvListing:
  """The files labels.csv lists, with their labels, per split ('': split by fractions)."""
  root: str
  classes: list[str]
  files: dict[str, list[tuple[File, tuple[str, ...]]]]
  digest: str  # sha256 of labels.csv: a label edit alone must re-prepare.
  unlisted: list[str]  # Images under the root that labels.csv does not list.


def parse_labels(text: str) -> tuple[str, ...]:
  """'cat; dog cat' -> ('cat', 'dog'): names split at ';' or whitespace, sorted, distinct."""
  return tuple(sorted(set(re.split(r'[;\s]+', text.strip())) - {''}))


def read_csv(path: str) -> tuple[list[tuple[str, tuple[str, ...]]], bytes]:
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


def list_csv(root: str) -> CsvListing:
  """The images labels.csv lists, checked; every problem found here is a DataError."""
  path = os.path.join(root, CSV_NAME)
  rows, raw = read_csv(path)
  files, missing = [], []
  for rel, labels in rows:
    try:
      st = os.stat(os.path.join(root, rel))
    except OSError:
      st = None
    if st is None or not stat.S_ISREG(st.st_mode):
      missing.append(rel)
    else:
      files.append((File(rel, st.st_size, st.st_mtime_ns), labels))
  if missing:
    more = f' and {len(missing) - SHOWN} more' if len(missing) > SHOWN else ''
    raise DataError(f'{len(missing)} file(s) listed in {path} do not exist: '
                    f'{", ".join(missing[:SHOWN])}{more}. Fix the filename column (paths are '
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
  unlisted = [f.path for f in images(root, '', []) if f.path not in listed]
  return CsvListing(root, classes, by_split, hashlib.sha256(raw).hexdigest(), unlisted)


def csv_fingerprint(listing: CsvListing, split: dict[str, float], seed: int) -> str:
  """Hash of what the prepared copy depends on: the CSV, the files, the split settings."""
  h = hashlib.sha256(f'{FORMAT}|csv|{listing.digest}'.encode())
  if '' in listing.files:
    h.update(f'|{sorted(split.items())}|{seed}'.encode())
  for split_name, items in sorted(listing.files.items()):
    for f, _ in items:
      h.update(f'\n{split_name}|{f.path}|{f.size}|{f.mtime_ns}'.encode())
  return h.hexdigest()[:16]


def assign_csv(root: str, items: list, split: dict[str, float], seed: int) -> dict[str, list]:
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


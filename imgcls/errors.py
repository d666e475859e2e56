"""The errors that mean bad input, at the bottom of the package so that every module may
raise them without importing the config schema (or anything heavy).

Every error a person can fix (a config key, a dataset, a checkpoint, a weights file) is a
`UserError`: the CLI prints its message as one line and exits non-zero, without a traceback.
"""


class UserError(ValueError):
  """Bad input; the message names the problem and the fix."""


class ConfigError(UserError):
  """A config that cannot run; the message names the key and the fix."""

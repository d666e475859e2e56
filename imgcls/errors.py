"""The error a config that cannot run raises, at the bottom of the package so that every
module may raise it without importing the config schema."""


class ConfigError(ValueError):
  """A config that cannot run; the message names the key and the fix."""

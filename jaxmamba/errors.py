"""The base of the errors a user can fix from the message alone.

`experiments.run` (and the other command-line tools) print these as one line, `error: ...`; any
other exception is a bug or an environment problem and keeps its traceback.  Each subclass is also
a ValueError, as the errors it replaced were.
"""


class UserError(ValueError):
  """Bad input from the user (config, data, checkpoint, workdir); the message says what to do."""


class ConfigError(UserError):
  """A config value that cannot work (named in the message with the accepted values)."""

"""The error raised for every problem with input data."""
from jaxmamba.errors import UserError


class DataError(UserError):
  """Bad input data: a missing folder, an unpaired, unreadable or malformed file.

  The message always names the file (or folder) and says what is wrong with it.
  """

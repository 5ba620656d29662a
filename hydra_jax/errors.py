"""The project's error for user mistakes: a bad config, a missing or mismatched file, unprepared data.

The command line prints a `UserError` as one line naming the problem and the fix (no traceback), and every
other exception with its traceback, so that an internal bug is never dressed up as a user error:

  try:
    pipeline.train_and_evaluate(config, workdir)
  except errors.UserError as error:
    print(f"error: {error}")

`ConfigError` (config.py), `CheckpointError` (checkpoints.py), `DataError` and `MissingDataError` (data.py)
subclass it; all are `ValueError`s.
"""


class UserError(ValueError):
  """A problem with the user's input that the message tells how to fix."""


class ConfigError(UserError):
  """A config key that does not exist or a value that is invalid; the message names the key."""


class DataError(UserError):
  """A data file that cannot be read or holds the wrong content."""


class MissingDataError(DataError, FileNotFoundError):
  """A dataset that is not prepared or a data file that does not exist; also a FileNotFoundError."""

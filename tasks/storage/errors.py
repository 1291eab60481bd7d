"""What storage raises: one base class, so a caller can catch every storage failure."""

from model.errors import UserError


class StorageError(UserError, RuntimeError):
    """Storage failed after bounded retries; the message says what to check."""


class ObjectExistsError(StorageError):
    """A conditional put (`if_absent=True`) found the key already there."""


class MissingObjectError(StorageError, KeyError):
    """The object does not exist. Also a KeyError, so `except KeyError` works."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""

"""The one exception family payscope raises on bad input or bad state.

    PayscopeError            anything the user can fix; the CLI prints it and exits 2
    ├── InputError           a file, request or argument that could not be read
    └── StoreError           the store cannot be opened or is of another schema
"""


class PayscopeError(Exception):
    """A problem the user can fix; the message is one readable sentence."""


class InputError(PayscopeError):
    """Input (a file, a request body, an argument) that payscope could not read."""


class StoreError(PayscopeError):
    """The store could not be opened, or it is not a payscope store."""

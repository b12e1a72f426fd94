"""The errors a user can fix (a recipe key, a path, a file): each is one line naming what to fix, and
exit status 2 from every command. Nothing here imports the rest of the project."""


class UserError(Exception):
    """Bad input: one line naming the key, flag or file."""


class RecipeError(UserError):
    """A recipe key or value."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, not this project's, or holds more than tensors and plain data."""


class LoaderError(UserError):
    """Data: a missing path, an unusable file, a missing backend."""


__all__ = ["CheckpointError", "LoaderError", "RecipeError", "UserError"]

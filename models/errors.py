"""Domain errors of the model layer; the CLI and the HTTP middleware turn them into messages."""


class CheckpointError(Exception):
    """A checkpoint folder is missing, corrupt or of an unsupported kind; the message names the file."""


class GenerationError(Exception):
    """A generation request cannot be served as asked (e.g. prompt longer than the context)."""

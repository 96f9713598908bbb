"""The error raised for unusable input data."""


class DataError(ValueError):
    """Input data medeman cannot train on; the message lists each problem on its own line, naming the file."""

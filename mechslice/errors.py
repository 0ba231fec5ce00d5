"""The one exception type a user is meant to see: bad input, said in one line with what to do."""


class MechsliceError(Exception):
    """Bad input or an unsupported request; the CLI prints it as `error: ...` and exits 2."""

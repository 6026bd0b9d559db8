"""The base of every error promptkd raises for bad input; the CLI prints these without a traceback."""


class PromptKDError(Exception):
    """Bad input or state, with a message that names the file or value and says what to do next."""

"""One exception type for every failure a user can fix.

The CLI turns an `EdgepruneError` into a single red line and its exit code, never a traceback.
Exit codes follow the brief: 2 = bad input, 3 = targets impossible, 1 = a gate/verification failed.
"""


class EdgepruneError(Exception):
    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class VerificationError(EdgepruneError):
    """An exported artifact disagreed with the torch model; nothing was left under the final name."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)

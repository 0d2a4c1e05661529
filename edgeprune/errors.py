"""One exception type for every failure a user can fix, and the CLI's exit-code contract.

The CLI turns an `EdgepruneError` into a single line on stderr and its exit code, never a
traceback:

  0   success
  1   a gate or a verification failed (`check`, an export that disagreed with torch)
  2   bad input: an option value, a model, a file, a plan or a profile that cannot be used
  3   the targets cannot be met (`fit`: no candidate satisfies the profile)
  70  a bug in edgeprune (an unexpected exception; the line asks for a report)
  130 / 143  interrupted by SIGINT / SIGTERM (128 + signal), nothing left behind
"""

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
EXIT_BUG = 70


class EdgepruneError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


class VerificationError(EdgepruneError):
    """An exported artifact disagreed with the torch model; nothing was left under the final name."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=EXIT_GATE_FAILED)

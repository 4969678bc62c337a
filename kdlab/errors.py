"""The one exception type for mistakes a user can fix (bad config, missing files, empty data).

The CLI turns it into a single `kdlab: error: ...` line and exit code 2; library users catch it
like any ValueError. Bugs in kdlab itself stay ordinary exceptions with tracebacks.
"""


class KDLabError(ValueError):
    """A user-fixable problem. The message names the bad value and what is allowed."""

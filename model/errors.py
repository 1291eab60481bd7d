"""The one base class of the failures a user can act on."""


class UserError(Exception):
    """Bad input, a bad setting, a missing model, a service that is down: the message says
    what to do. The command line prints it as one line; any other exception is a bug and
    keeps its traceback. `resumable`: rerunning with the same run key continues the work."""

    resumable = False

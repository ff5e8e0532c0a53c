"""The one base class of the errors a user can fix (the CLI's "front door" for bad input).

Every error raised for bad input or an unusable artifact subclasses `UserError` (ConfigError, PromptsError,
StoreError, LoRAError, ...), so `tlcm` catches exactly one class: it prints the message as `error: <message>`
(one line; a config validation report may list one field a line) and exits 2, without a traceback. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix. Its message names what is wrong, the offending value and the fix
    (e.g. "trajectories.prompts='/x.txt': not found; give a text file with one prompt a line"). The CLI prints it
    as one line, `error: <message>`, and exits 2.

    Subclasses keep their historical base as well (`class ConfigError(UserError, ValueError)`), so code that
    catches them by that base still does.
    """


__all__ = ["UserError"]

"""The one base class for mistakes in a user's input, and the one way to find it inside Ray's wrappers.

The CLI prints such an error as one line on stderr and exits with status 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import importlib
import re

_ERROR_LINE = re.compile(r"^(mrm_ray(?:\.\w+)+)\.(\w+): (.+)$", re.M)


class UserError(Exception):
    """Bad input (a table, a config value, a location): the message is one line for a user."""


def unwrap(e: BaseException) -> BaseException:
    """Our one-line UserError inside an exception Ray raised for a failed task, actor, UDF or training
    run (the exception itself when there is none), ready to `raise ... from None`.

    Ray Data reports a UDF failure as RayTaskError(UserCodeException) whose
    only trace of the original error is the remote traceback text, so the
    last resort is its `mrm_ray.module.SomeError: message` line.
    """
    cur = e
    while cur is not None:
        if isinstance(cur, UserError) and type(cur).__module__.startswith("mrm_ray"):
            return type(cur)(str(cur).splitlines()[0] if str(cur) else type(cur).__name__)
        cur = getattr(cur, "cause", None) or cur.__cause__
    for module, name, message in reversed(_ERROR_LINE.findall(str(e))):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, UserError):
            return cls(message.strip())
    return e

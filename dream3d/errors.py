"""The one family of errors a user can cause, and their one-line message.

Every front end (the CLI, the web app, the batch runner) reports these the same way: one
line, no traceback. The libraries (``guidance``, ``representations``) cannot import the app,
so their error classes join the family here, imported only when an error is being classified
(the CLI's ``--help`` imports no torch).
"""

from __future__ import annotations

MAX_MESSAGE_CHARS = 1000  # paths can be long; a 5 MB prompt must not come back whole


class UserError(Exception):
    """A failure the user caused or can fix (bad input, a missing model, a full disk); one line.

    The app's error classes derive from it (and from ValueError or RuntimeError as before)."""


def user_errors() -> tuple[type[Exception], ...]:
    """Every exception class whose message is meant for the user as is: the app's UserError family
    and the libraries' own one-line errors."""
    from dream3d.guidance.base import GuidanceError
    from dream3d.guidance.priors.base import PriorError
    from dream3d.representations.marching_cubes import MeshError
    from dream3d.representations.nerf import SamplerError
    from dream3d.representations.splat_ply import PLYError

    return UserError, GuidanceError, PriorError, MeshError, PLYError, SamplerError


def one_line(error: BaseException) -> str:
    """The error's message on one line, cut to ``MAX_MESSAGE_CHARS`` (a 5 MB prompt is not echoed back)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."

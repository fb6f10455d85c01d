"""Checks of what the server needs at start, made before anything starts.

So that a mistake is one line that names it, before the "listening" line and before
any worker is started (a worker that found it would die, be started again, and die
again): the TLS certificate and key load and belong together, and the directory of
the multi-process metrics exists.
"""

from __future__ import annotations

import os
import ssl

from .errors import StartupError
from .metrics import MULTIPROCESS_DIR
from .settings import Settings


def check_files(settings: Settings) -> None:
    """Raise ``StartupError`` naming the setting when a file the server needs is wrong."""
    server = settings.server
    if server.certfile is not None and server.keyfile is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(server.certfile, server.keyfile)
        except ssl.SSLError as error:
            reason = error.reason or "not a PEM certificate and key"
            if reason == "KEY_VALUES_MISMATCH":
                reason = "the key is not the certificate's"
            raise StartupError(
                f"server.certfile {server.certfile} / server.keyfile {server.keyfile}: {reason}"
            ) from None
        except OSError as error:
            raise StartupError(
                f"server.certfile / server.keyfile: {error.strerror or error}"
            ) from None
    directory = os.environ.get(MULTIPROCESS_DIR)
    if directory is not None and not os.path.isdir(directory):
        raise StartupError(
            f"{MULTIPROCESS_DIR} is {directory!r}, which is not a directory "
            "(the metrics of several workers are kept there)"
        )

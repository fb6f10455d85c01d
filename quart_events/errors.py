"""Every failure a client or an operator can be told about, and its wording.

Messages here reach clients as they are: they name what the client asked for
(an exchange), never anything internal (hosts, users, library errors). Input
errors of the ``bindings`` parameter are in ``bindings.py``, whose messages are
the original service's, word for word.
"""

from __future__ import annotations

TOO_SLOW = "The stream was closed because the client read it too slowly."
BINDING_FAILED = "binding failed"


class StartupError(Exception):
    """The server cannot start; the message says what failed and where (one line)."""


class ListenFailed(StartupError):
    """The listening socket cannot be had (the port is taken, the address is wrong)."""


class BrokerError(Exception):
    """A broker failure, worded so it can be shown to a client or an operator."""


class BrokerUnavailable(BrokerError):
    """RabbitMQ cannot be reached or refused us."""


class NotConnected(BrokerError):
    """There is no broker connection at the moment (the work is redone on the next one)."""


class BindFailed(BrokerError):
    """RabbitMQ refused a binding; the message names the exchange, nothing internal."""

    @classmethod
    def missing(cls, exchange: str) -> BindFailed:
        return ExchangeMissing(f"exchange `{exchange}` does not exist")

    @classmethod
    def refused(cls, exchange: str) -> BindFailed:
        return cls(f"access to exchange `{exchange}` refused")

    @classmethod
    def unavailable(cls, exchange: str) -> BindFailed:
        return cls(
            f"could not bind to exchange `{exchange}`: "
            "the message broker is unavailable, try again later"
        )

    @classmethod
    def busy(cls, exchange: str) -> BindFailed:
        return cls(
            f"could not bind to exchange `{exchange}` in time: "
            "the server is busy binding for other streams, try again later"
        )


class ExchangeMissing(BindFailed):
    """The exchange of a binding does not exist."""


def client_message(error: BaseException) -> str:
    """What a stream's ``error`` event says about a failed binding."""
    return str(error) if isinstance(error, BindFailed) else BINDING_FAILED

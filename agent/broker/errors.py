"""Broker errors, and what each proves about whether money moved."""

from __future__ import annotations

# Deriv error codes that prove nothing moved (DESIGN.md section 2): the transfer is `failed`.
NOTHING_MOVED = frozenset({
    "InputValidationFailed", "SanityCheckFailed", "BadRequest", "UnrecognisedRequest", "AuthorizationRequired",
    "InvalidToken", "PermissionDenied", "RateLimit", "InvalidAppID", "InvalidLoginid", "MT5DepositError",
    "NoMoney", "MaximumTransfers", "MaximumAmountTransfers", "CurrencyShouldMatch",
    "TransferBetweenDifferentCurrencies", "MT5DepositLocked", "MT5KYCDepositLocked", "MT5KYCWithdrawalLocked",
    "FinancialAssessmentRequired",
    # the agent's own: the request never left this process
    "NotSent",
})
# The agent's own codes that prove nothing moved: a broker reply carrying one is not believed (BadReply), or a
# malformed frame could pass for the client's proof that the request never left.
AGENT_ONLY_CODES = frozenset({"NotSent"})
# Codes that need an operator rather than a retry: the token or the account set-up is wrong.
NEEDS_OPERATOR = frozenset({"InvalidToken", "PermissionDenied", "InvalidAppID", "InvalidLoginid",
                            "AuthorizationRequired", "MissingScope"})


class BrokerError(Exception):
    """An error from, or on the way to, the broker. `code` is the broker's code verbatim or the agent's own.

    `before_send` is the client's own proof that the request's frame was never handed to the socket (the
    connection or its authorization failed first, or the request failed its schema): whatever the code says,
    the broker cannot have executed it.
    """

    def __init__(self, code: str, message: str, *, before_send: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.before_send = before_send

    @property
    def nothing_moved(self) -> bool:
        """True only when the error proves the broker did not execute the request."""
        return self.before_send or self.code in NOTHING_MOVED

    @property
    def needs_operator(self) -> bool:
        return self.code in NEEDS_OPERATOR


class NotSent(BrokerError):
    """The request never left: not connected, or the send itself failed. Nothing moved."""

    def __init__(self, message: str) -> None:
        super().__init__("NotSent", message, before_send=True)


class LostReply(BrokerError):
    """The request went out but no reply came (Timeout, ConnectionClosed): the outcome is unknown."""


class BadReply(BrokerError):
    """A reply that failed its schema or made no sense: not believed, the outcome is unknown."""

    def __init__(self, message: str) -> None:
        super().__init__("MalformedReply", message)

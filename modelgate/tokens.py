"""The checks of an API key token a client can make without the key store.

A token is ``<key id>.<secret>``, as ``modelgate keys create`` printed it.
Both transports run :func:`split_token` when they are built, so an empty
token and a token no key can have fail the same way, at the same time,
whichever transport is used. Whether a well-formed key id exists, and so
which code a malformed secret gets, only the gateway knows: it is left to
the front door or the worker, which answer ``AUTH_UNKNOWN_KEY`` for an id no
key has and ``AUTH_BAD_SIGNATURE`` otherwise.

This module imports only the wire formats and the client's errors.
"""

from __future__ import annotations

from gateway.protocol import KEY_ID_PATTERN
from modelgate.errors import AuthMissingError, UnknownKeyError


def split_token(token: str) -> tuple[str, str]:
    """The key id and the secret text of ``token``, surrounding space removed.

    Parameters
    ----------
    token
        The API key token.

    Returns
    -------
    tuple[str, str]
        The key id (well formed) and the text after its ``.``, which may be
        empty or malformed: only the gateway can say what that deserves.

    Raises
    ------
    AuthMissingError
        ``AUTH_MISSING``: the token is empty or only white space.
    UnknownKeyError
        ``AUTH_UNKNOWN_KEY``: the part before the ``.`` is not a key id, so no
        key can have it (what the gateway answers to such a token). The
        message never repeats the token.

    Examples
    --------
    >>> split_token(" mgk_0123456789ab.c2VjcmV0 ")
    ('mgk_0123456789ab', 'c2VjcmV0')
    """
    stripped = token.strip()
    if not stripped:
        raise AuthMissingError(
            "no API key token given: pass the token `modelgate keys create` printed",
            retriable=False,
        )
    key_id, _, secret = stripped.partition(".")
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise UnknownKeyError(
            "malformed API key token: it must be the whole token "
            "`modelgate keys create` printed, <key id>.<secret>, the key id "
            "being mgk_ and 12 lowercase hex digits",
            retriable=False,
        )
    return key_id, secret

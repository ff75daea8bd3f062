"""The admin API's bearer token.

The token comes from the environment (`LAMP_ADMIN_TOKEN`) of the serving processes and is compared
in constant time; it never appears in a log line, an error message or a metric. Without it the
admin API is off rather than open.
"""

from __future__ import annotations

import hmac

from .errors import ServingError

TOKEN_ENV = "LAMP_ADMIN_TOKEN"


class AdminAuth:
    def __init__(self, token: str | None):
        self._token = token.encode("utf-8") if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, authorization: str | None) -> None:
        if self._token is None:
            raise ServingError(403, f"the admin API is disabled: set {TOKEN_ENV} in the server's environment "
                                    "and restart it to enable it")
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise ServingError(401, f"admin API needs 'Authorization: Bearer <{TOKEN_ENV}>'",
                               headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.strip().encode("utf-8"), self._token):
            raise ServingError(403, "invalid admin token")

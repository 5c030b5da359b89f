"""Authentication — ``web.auth_token`` (a secret) is accepted as ``Authorization: Bearer TOKEN`` (API
clients) or as the password of HTTP basic auth for ``web.auth_user`` (browsers: "Sign in" asks for it).

The pages' state-changing forms (replay a dead letter, review a finding) need credentials and, for
browser (basic-auth) credentials, which the browser would attach to a forged cross-site request too,
a CSRF token derived from the secret (HMAC) in the form, plus an Origin header, when sent, naming
this host."""

import base64
import binascii
import hashlib
import hmac
from urllib.parse import parse_qs, urlsplit

from fastapi import HTTPException, Request

from config.settings import Settings

SIGN_IN = {"WWW-Authenticate": 'Basic realm="Lung Vision"'}  # makes a browser ask for basic-auth credentials
UNAUTHENTICATED = "no Bearer token (or basic-auth sign-in), or a wrong one"


class Authentication:
    """A FastAPI dependency: "bearer" or "basic" when the request carries the configured secret, else None."""

    def __init__(self, settings: Settings) -> None:
        self.token = settings.web.auth_token.get_secret_value() if settings.web.auth_token else None
        self.user = settings.web.auth_user
        # one CSRF token for every form; the HMAC message is kept as it was when replay was the only form
        self.csrf_token = (
            hmac.new(self.token.encode(), b"lungvision-replay", hashlib.sha256).hexdigest() if self.token else None
        )

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def __call__(self, request: Request) -> str | None:
        if self.token is None:
            return None
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode()):
            return "bearer"
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):  # a malformed header: simply not signed in
                return None  # (the answer is 401 and says so; nothing to log per request)
            if hmac.compare_digest(user.encode(), self.user.encode()) and hmac.compare_digest(
                password.encode(), self.token.encode()
            ):
                return "basic"
        return None

    async def form_fields(self, request: Request, auth: str | None, action: str) -> dict[str, list[str]]:
        """The fields of a page's state-changing form, after checking who sent it: credentials are
        required, and browser (basic-auth) ones only count with our CSRF token and no foreign Origin."""
        if auth is None:
            raise HTTPException(401, f"sign in to {action}", headers=SIGN_IN)
        form = parse_qs((await request.body()).decode(errors="replace"))
        if auth == "basic":  # browser credentials: require proof the form came from our page
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                raise HTTPException(403, "cross-origin request refused")
            token = self.csrf_token  # set whenever basic-auth sign-in is possible
            if token is None or not hmac.compare_digest(form.get("csrf", [""])[0].encode(), token.encode()):
                raise HTTPException(403, "missing or wrong CSRF token")
        return form


def require_bearer(auth: str | None) -> None:
    """API calls that change something take the Bearer token only (browsers use the pages' forms)."""
    if auth != "bearer":
        raise HTTPException(401, "a Bearer token is required", headers={"WWW-Authenticate": "Bearer"})


def require_sign_in(auth: str | None, purpose: str) -> None:
    if auth is None:
        raise HTTPException(401, f"sign in (web.auth_token) to {purpose}", headers=SIGN_IN)

"""A token server in Docker Hub's manner, run as a subprocess by the upstream fixture.

Anonymous callers get ``pull`` on any repository; callers with Basic ``admin:<password>`` get what they ask
for (``push`` too, for seeding). Tokens are RS256 JWTs whose ``kid`` is the libtrust key id of the
certificate the registry trusts (see TESTING-NOTES). Every request is appended to ``--log`` as one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
import uuid

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization


def libtrust_kid(public_key) -> str:
    import hashlib

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--admin-password", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    with open(args.key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    kid = libtrust_kid(key.public_key())

    async def token(request: web.Request) -> web.Response:
        service = request.query.get("service", "")
        admin = False
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if user != "admin" or password != args.admin_password:
                return web.json_response({"details": "bad credentials"}, status=401)
            admin = True
        access = []
        for scope in request.query.getall("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            granted = wanted if admin else [a for a in wanted if a == "pull"]
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": args.issuer,
            "sub": "admin" if admin else "",
            "aud": service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signed = jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})
        with open(args.log, "a") as f:  # noqa: ASYNC230 -- a test fixture's tiny log line
            f.write(json.dumps({"admin": admin, "scopes": request.query.getall("scope", [])}) + "\n")
        return web.json_response({"token": signed, "access_token": signed, "expires_in": 300})

    app = web.Application()
    app.router.add_get("/token", token)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()

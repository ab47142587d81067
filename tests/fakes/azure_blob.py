"""Blob storage on the wire, as far as azure-ai-ml's uploads of models and code use it.

The Blob service REST API: `PUT` a block blob (or its blocks and block list), `PUT ?comp=metadata`,
`HEAD`/`GET` a blob's properties, `GET ?restype=container&comp=list` (XML `EnumerationResults`), `DELETE`.
Blobs are files under the fake workspace's folder, so the deployment's container later reads what the SDK
uploaded. A request without a SAS signature or a bearer token is refused with 403, as storage does.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from email.utils import formatdate
from pathlib import Path
from typing import Callable
from xml.sax.saxutils import escape

from fakes.azure_state import FakeWorkspaceState
from fakes.azure_wire import WireRequest, WireResponse

_HOST = r"(?P<account>[a-z0-9]+)\.blob\.core\.windows\.net"


def blob_root(state: FakeWorkspaceState, account: str, container: str) -> Path:
    return state.root / "blobs" / account / container


def _error(status: int, code: str, message: str) -> WireResponse:
    body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{escape(message)}'
            "</Message></Error>").encode()
    return WireResponse(status, body, {"Content-Type": "application/xml", "x-ms-error-code": code})


class BlobService:
    def __init__(self, state: FakeWorkspaceState):
        self.state = state

    def _path(self, match: re.Match) -> Path:
        root = blob_root(self.state, match["account"], match["container"])
        path = (root / match["blob"]).resolve()
        if not str(path).startswith(str(root.resolve())):
            raise ValueError("blob path escapes its container")
        return path

    @staticmethod
    def _authorized(request: WireRequest) -> bool:
        return "sig" in request.query or request.headers.get("authorization", "").startswith(("Bearer ", "SharedKey "))

    @staticmethod
    def _meta_path(path: Path) -> Path:
        return path.with_name(f".{path.name}.meta.json")

    def _headers(self, path: Path) -> dict[str, str]:
        content = path.read_bytes()
        meta = json.loads(self._meta_path(path).read_text()) if self._meta_path(path).exists() else {}
        headers = {"Content-Length": str(len(content)), "Content-Type": "application/octet-stream",
                   "Last-Modified": formatdate(path.stat().st_mtime, usegmt=True),
                   "ETag": f'"{hashlib.md5(content).hexdigest()}"', "x-ms-blob-type": "BlockBlob",
                   "Content-MD5": base64.b64encode(hashlib.md5(content).digest()).decode()}
        headers.update({f"x-ms-meta-{k}": v for k, v in meta.items()})
        return headers

    def blob(self, request: WireRequest, match: re.Match) -> WireResponse:
        if not self._authorized(request):
            return _error(403, "AuthenticationFailed", "Server failed to authenticate the request.")
        path = self._path(match)
        comp = request.query.get("comp")
        if request.method == "PUT" and comp == "block":
            blocks = path.with_name(f".{path.name}.blocks")
            blocks.mkdir(parents=True, exist_ok=True)
            (blocks / base64.urlsafe_b64encode(request.query["blockid"].encode()).decode()).write_bytes(request.body)
            return WireResponse(201, b"", {"Content-MD5": base64.b64encode(hashlib.md5(request.body).digest()).decode()})
        if request.method == "PUT" and comp == "blocklist":
            blocks = path.with_name(f".{path.name}.blocks")
            ids = re.findall(rb"<(?:Latest|Committed|Uncommitted)>([^<]+)</", request.body)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"".join((blocks / base64.urlsafe_b64encode(i).decode()).read_bytes() for i in ids))
            self._write_meta(path, request)
            return WireResponse(201, b"", {"ETag": self._headers(path)["ETag"]})
        if request.method == "PUT" and comp == "metadata":
            if not path.exists():
                return _error(404, "BlobNotFound", "The specified blob does not exist.")
            self._write_meta(path, request, replace=True)
            return WireResponse(200, b"", {"ETag": self._headers(path)["ETag"]})
        if request.method == "PUT":
            if request.headers.get("if-none-match") == "*" and path.exists():
                return _error(409, "BlobAlreadyExists", "The specified blob already exists.")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(request.body)
            self._write_meta(path, request)
            return WireResponse(201, b"", {"ETag": self._headers(path)["ETag"],
                                           "Content-MD5": self._headers(path)["Content-MD5"]})
        if not path.is_file():
            return _error(404, "BlobNotFound", "The specified blob does not exist.")
        if request.method == "HEAD":
            return WireResponse(200, b"", self._headers(path))
        if request.method == "GET":
            return WireResponse(200, path.read_bytes(), self._headers(path))
        if request.method == "DELETE":
            path.unlink()
            return WireResponse(202, b"")
        return _error(405, "UnsupportedHttpVerb", f"{request.method} is not supported here.")

    def _write_meta(self, path: Path, request: WireRequest, replace: bool = False) -> None:
        meta = {} if replace or not self._meta_path(path).exists() else json.loads(self._meta_path(path).read_text())
        meta.update({k[len("x-ms-meta-"):]: v for k, v in request.headers.items() if k.startswith("x-ms-meta-")})
        self._meta_path(path).write_text(json.dumps(meta))

    def container(self, request: WireRequest, match: re.Match) -> WireResponse:
        if not self._authorized(request):
            return _error(403, "AuthenticationFailed", "Server failed to authenticate the request.")
        if request.query.get("comp") != "list":
            return WireResponse(200, b"", {"ETag": '"container"'})  # container properties: it exists
        root = blob_root(self.state, match["account"], match["container"])
        prefix = request.query.get("prefix", "")
        blobs = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                       if p.is_file() and not p.name.startswith(".")) if root.exists() else []
        items = []
        for name in (b for b in blobs if b.startswith(prefix)):
            headers = self._headers(root / name)
            meta = "".join(f"<{k[len('x-ms-meta-'):]}>{escape(v)}</{k[len('x-ms-meta-'):]}>"
                           for k, v in headers.items() if k.startswith("x-ms-meta-"))
            items.append(f"<Blob><Name>{escape(name)}</Name><Properties><Last-Modified>{headers['Last-Modified']}"
                         f"</Last-Modified><Etag>{headers['ETag']}</Etag><Content-Length>{headers['Content-Length']}"
                         "</Content-Length><Content-Type>application/octet-stream</Content-Type>"
                         "<BlobType>BlockBlob</BlobType></Properties>"
                         f"<Metadata>{meta}</Metadata></Blob>")
        body = (f'<?xml version="1.0" encoding="utf-8"?><EnumerationResults ServiceEndpoint="https://'
                f'{match["account"]}.blob.core.windows.net/" ContainerName="{match["container"]}">'
                f"<Prefix>{escape(prefix)}</Prefix><Blobs>{''.join(items)}</Blobs><NextMarker /></EnumerationResults>")
        return WireResponse(200, body.encode(), {"Content-Type": "application/xml"})


def routes(state: FakeWorkspaceState) -> list[tuple[str | None, re.Pattern, Callable]]:
    blobs = BlobService(state)
    return [(None, re.compile(rf"{_HOST}/(?P<container>[^/]+)/(?P<blob>.+)", re.IGNORECASE), blobs.blob),
            (None, re.compile(rf"{_HOST}/(?P<container>[^/]+)/?", re.IGNORECASE), blobs.container)]

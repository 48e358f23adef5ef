"""Download a model into a directory, verified and atomic (the init container's job).

Schemes: ``http(s)://`` (urllib), ``s3://bucket/key`` (boto3: the usual ``AWS_*``
variables, ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` for S3-compatible stores),
``gs://bucket/object`` (google-cloud-storage: application default credentials,
``STORAGE_EMULATOR_HOST`` for emulators), ``pvc://<claim>/<path>`` (the claim is
mounted at ``<pvc_root>/<claim>``, ``/mnt/pvc`` unless ``MODELDEPLOY_PVC_ROOT`` says
otherwise) and ``file://``.

The bytes go to a temporary file in the destination directory while being hashed;
only a file whose sha256 matches is renamed into place, so a reader never sees a
partial or unverified model.  Transient failures (connection errors, 5xx, 429) are
retried with exponential backoff; a wrong digest, a download past ``max_bytes`` and a
full disk are not.

What a URI may carry in secret (``user:password@``, a presigned query) never reaches a
log line or an error message: ``redacted`` is what is shown, and every error leaving
``fetch`` is scrubbed of the secret parts, whatever library raised it.  An https
download never follows a redirect to http.  ``pvc://`` and ``file://`` paths stay
inside their root: ``..`` segments and symlinks that lead out are refused.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from modeldeploy_contract import paths

logger = logging.getLogger(__name__)

ATTEMPTS = 5
FIRST_BACKOFF_S = 0.5
_CHUNK = 1 << 20
_PROGRESS_EVERY_S = 5.0
_RETRIED_HTTP = {408, 425, 429, 500, 502, 503, 504}


class FetchError(Exception):
    """The model could not be fetched; the message says why."""


class _TransientError(Exception):
    """A failure worth another attempt."""


class _RefusedRedirect(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but never from https to plain http."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if req.full_url.startswith("https:") and not newurl.lower().startswith("https:"):
            raise FetchError(
                f"{redacted(req.full_url)} redirected to {redacted(newurl)}: a redirect from "
                "https to http is refused"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_opener = urllib.request.build_opener(_RefusedRedirect)


class _Sink:
    """Writes chunks to the temporary file, hashing them and logging progress."""

    def __init__(self, stream: IO[bytes], uri: str, max_bytes: int | None) -> None:
        self._stream = stream
        self._uri = uri
        self._max_bytes = max_bytes
        self.digest = hashlib.sha256()
        self.written = 0
        self._total: int | None = None
        self._last_log = time.monotonic()

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int | None) -> None:
        self._total = value
        if value is not None:
            self._check_size(value)

    def _check_size(self, size: int) -> None:
        if self._max_bytes is not None and size > self._max_bytes:
            raise FetchError(
                f"{self._uri} is larger than maxSizeBytes ({size} > {self._max_bytes} bytes)"
            )

    def write(self, chunk: bytes) -> int:
        self._check_size(self.written + len(chunk))
        try:
            self._stream.write(chunk)
        except OSError as error:
            # The volume is full (or gone): another attempt would fail the same way.
            if error.errno == errno.ENOSPC:
                raise FetchError(
                    f"no space left writing {self._uri} after {self.written} bytes; the volume's "
                    "sizeLimit follows maxSizeBytes"
                ) from None
            raise FetchError(f"cannot write {self._uri}: {error.strerror}") from None
        self.digest.update(chunk)
        self.written += len(chunk)
        now = time.monotonic()
        if now - self._last_log >= _PROGRESS_EVERY_S:
            self._last_log = now
            of_total = f" of {self.total / 2**20:.1f}" if self.total else ""
            logger.info("%s: %.1f%s MiB", self._uri, self.written / 2**20, of_total)
        return len(chunk)

    def write_all(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)


Download = Callable[[_Sink], None]


def redacted(uri: str) -> str:
    """The URI as logs and errors show it: presigned URLs carry signatures in the query, and a
    URI may carry a password; neither is written anywhere."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "<redacted>" if parts.query else "", ""))


def scrubbed(message: str, uri: str) -> str:
    """``message`` with every secret part of ``uri`` (userinfo, query) replaced."""
    parts = urlsplit(uri)
    secrets = [uri, parts.query, parts.netloc.rpartition("@")[0], parts.password or ""]
    secrets += [unquote(secret) for secret in secrets]
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        message = message.replace(secret, redacted(uri) if secret == uri else "<redacted>")
    return message


def fetch(
    uri: str,
    dest: Path,
    sha256: str | None,
    *,
    pvc_root: Path,
    max_bytes: int | None = None,
    attempts: int = ATTEMPTS,
) -> Path:
    """Fetch ``uri`` into ``dest/<file name>``; returns the path written.

    Every failure is a ``FetchError`` whose message carries none of the URI's secrets.
    """
    try:
        return _fetch(uri, dest, sha256, pvc_root, max_bytes, attempts)
    except FetchError as error:
        raise FetchError(scrubbed(str(error), uri)) from None
    except Exception as error:  # whatever a library raised: shown, never its secrets
        raise FetchError(
            f"{redacted(uri)}: {type(error).__name__}: {scrubbed(str(error), uri)}"
        ) from None


def _fetch(
    uri: str, dest: Path, sha256: str | None, pvc_root: Path, max_bytes: int | None, attempts: int
) -> Path:
    parts = urlsplit(uri)
    shown = redacted(uri)
    try:
        name = paths.artifact_name(uri)
    except ValueError as error:
        raise FetchError(f"{shown} {error}") from None
    download = _downloader(parts, pvc_root)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / name
    for attempt in range(1, attempts + 1):
        try:
            _fetch_once(shown, download, target, sha256, max_bytes)
            return target
        except _TransientError as error:
            if attempt == attempts:
                raise FetchError(f"{shown}: giving up after {attempts} attempts: {error}") from None
            delay = FIRST_BACKOFF_S * 2 ** (attempt - 1)
            logger.warning("%s: %s; retrying in %.1f s", shown, error, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _fetch_once(
    shown: str, download: Download, target: Path, sha256: str | None, max_bytes: int | None
) -> None:
    started = time.monotonic()
    with tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False
    ) as stream:
        temporary = Path(stream.name)
        try:
            sink = _Sink(stream, shown, max_bytes)
            download(sink)
            stream.flush()
            os.fsync(stream.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    actual = sink.digest.hexdigest()
    if sha256 is not None and actual != sha256.lower():
        temporary.unlink(missing_ok=True)
        raise FetchError(f"sha256 mismatch for {shown}: expected {sha256.lower()}, got {actual}")
    temporary.chmod(0o644)
    os.replace(temporary, target)
    logger.info(
        "%s: %d bytes in %.1f s, sha256 %s -> %s",
        shown,
        sink.written,
        time.monotonic() - started,
        actual,
        target,
    )


def _downloader(parts: SplitResult, pvc_root: Path) -> Download:
    scheme = parts.scheme
    if scheme in ("http", "https"):
        return lambda sink: _http(parts.geturl(), sink)
    if scheme == "s3":
        return lambda sink: _s3(parts.netloc, parts.path.lstrip("/"), sink)
    if scheme == "gs":
        return lambda sink: _gcs(parts.netloc, parts.path.lstrip("/"), sink)
    if scheme == "pvc":
        claim = pvc_root / parts.netloc
        path = _inside(claim, unquote(parts.path))
        return lambda sink: _copy(path, claim, sink)
    if scheme == "file":
        root = Path("/")
        path = _inside(root, unquote(parts.path))
        return lambda sink: _copy(path, root, sink)
    raise FetchError(f"unsupported URI scheme {scheme!r}; use http, https, s3, gs, pvc or file")


def _inside(root: Path, path: str) -> Path:
    """``path`` under ``root``; a ``..`` segment is refused before anything is opened."""
    if ".." in PurePosixPath(path).parts:
        raise FetchError(f"{path!r} has a '..' segment; paths must stay inside {root}")
    return root / path.lstrip("/")


def _copy(path: Path, root: Path, sink: _Sink) -> None:
    try:
        # Symlinks are followed only as far as they stay inside the root.
        if not path.resolve().is_relative_to(root.resolve()):
            raise FetchError(f"{path} leads outside {root} (a symlink); it is refused")
        with path.open("rb") as source:
            sink.total = os.fstat(source.fileno()).st_size
            shutil.copyfileobj(source, sink, _CHUNK)
    except FileNotFoundError:
        raise FetchError(f"{path} does not exist") from None


def _http(url: str, sink: _Sink) -> None:
    # urllib cannot open user:password@host URLs: the userinfo becomes a Basic header.
    parts = urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    request = urllib.request.Request(urlunsplit(parts._replace(netloc=host)))
    if userinfo:
        token = base64.b64encode(unquote(userinfo).encode()).decode()
        request.add_unredirected_header("Authorization", f"Basic {token}")
    try:
        with _opener.open(request, timeout=60) as response:
            length = response.headers.get("Content-Length")
            sink.total = int(length) if length else None
            sink.write_all(iter(lambda: response.read(_CHUNK), b""))
            if sink.total is not None and sink.written != sink.total:
                message = f"connection closed after {sink.written} of {sink.total} bytes"
                raise _TransientError(message)
    except urllib.error.HTTPError as error:
        if error.code in _RETRIED_HTTP:
            raise _TransientError(f"HTTP {error.code} {error.reason}") from None
        raise FetchError(f"{redacted(url)}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        raise _TransientError(str(error)) from None


def _s3(bucket: str, key: str, sink: _Sink) -> None:
    import boto3
    import botocore.exceptions

    # boto3 reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and
    # AWS_ENDPOINT_URL(_S3) itself; its own retries handle throttling.
    client = boto3.client("s3")
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        sink.total = response.get("ContentLength")
        sink.write_all(response["Body"].iter_chunks(_CHUNK))
    except botocore.exceptions.ClientError as error:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status in _RETRIED_HTTP:
            raise _TransientError(str(error)) from None
        raise FetchError(f"s3://{bucket}/{key}: {error}") from None
    except (botocore.exceptions.BotoCoreError, OSError) as error:
        if isinstance(error, botocore.exceptions.NoCredentialsError):
            raise FetchError(f"s3://{bucket}/{key}: {error}") from None
        raise _TransientError(str(error)) from None


def _gcs(bucket: str, name: str, sink: _Sink) -> None:
    from google.api_core import exceptions
    from google.cloud import storage

    try:
        client: Any = storage.Client()
        blob = client.bucket(bucket).blob(name)
        blob.reload()
        sink.total = blob.size
        blob.download_to_file(sink)
    except (exceptions.ServerError, exceptions.TooManyRequests, ConnectionError) as error:
        raise _TransientError(str(error)) from None
    except exceptions.GoogleAPIError as error:
        raise FetchError(f"gs://{bucket}/{name}: {error}") from None

"""``modeldeploy-runtime fetch`` against real local servers: HTTP, S3 (moto), GCS (emulator)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import ipaddress
import logging
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gcp_storage_emulator.server import create_server as create_gcs_emulator
from google.cloud import storage
from moto.server import ThreadedMotoServer
from runtime_fixtures import free_port, runtime_command

from modeldeploy_runtime import fetch

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    failures_left = 0
    redirect_to = ""

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/private/model.onnx":
            expected = "Basic " + base64.b64encode(b"reader:s3cret pass").decode()
            if self.headers.get("Authorization") != expected:
                self.send_error(401)
                return
            path = "/models/model.onnx"
        if path == "/redirect":
            self.send_response(302)
            self.send_header("Location", _Handler.redirect_to)
            self.end_headers()
            return
        if path != "/models/model.onnx":
            self.send_error(404)
            return
        if _Handler.failures_left > 0:
            _Handler.failures_left -= 1
            self.send_error(503, "warming up")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_http_download_is_verified_and_atomic(http_server: str, tmp_path: Path) -> None:
    path = fetch.fetch(f"{http_server}/models/model.onnx", tmp_path, DIGEST, pvc_root=tmp_path)
    assert path == tmp_path / "model.onnx"
    assert path.read_bytes() == PAYLOAD
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left


def test_transient_http_errors_are_retried(
    http_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "FIRST_BACKOFF_S", 0.01)
    _Handler.failures_left = 2
    path = fetch.fetch(f"{http_server}/models/model.onnx", tmp_path, DIGEST, pvc_root=tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert _Handler.failures_left == 0


def test_signatures_in_presigned_urls_are_never_logged_or_shown(
    http_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    presigned = f"{http_server}/models/model.onnx?X-Amz-Signature=s3cr3t&token=hunter2"
    fetch.fetch(presigned, tmp_path / "ok", DIGEST, pvc_root=tmp_path)
    with pytest.raises(fetch.FetchError) as mismatch:
        fetch.fetch(presigned, tmp_path / "bad", "0" * 64, pvc_root=tmp_path)
    with pytest.raises(fetch.FetchError) as missing:
        fetch.fetch(
            presigned.replace("model.onnx", "other.onnx"), tmp_path, None, pvc_root=tmp_path
        )
    shown = caplog.text + str(mismatch.value) + str(missing.value)
    assert "/models/model.onnx" in shown
    assert "s3cr3t" not in shown and "hunter2" not in shown


def test_http_404_is_not_retried(http_server: str, tmp_path: Path) -> None:
    with pytest.raises(fetch.FetchError, match="HTTP 404"):
        fetch.fetch(f"{http_server}/models/missing.onnx", tmp_path, None, pvc_root=tmp_path)


def test_sha256_mismatch_exits_non_zero_with_both_digests(http_server: str, tmp_path: Path) -> None:
    wrong = "0" * 64
    result = subprocess.run(
        runtime_command(
            "fetch",
            "--uri",
            f"{http_server}/models/model.onnx",
            "--sha256",
            wrong,
            "--dest",
            str(tmp_path),
        ),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert wrong in result.stderr
    assert DIGEST in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_s3_through_a_custom_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="models")
        s3.put_object(Bucket="models", Key="iris/3/model.onnx", Body=PAYLOAD)
        path = fetch.fetch("s3://models/iris/3/model.onnx", tmp_path, DIGEST, pvc_root=tmp_path)
        assert path.read_bytes() == PAYLOAD
        with pytest.raises(fetch.FetchError, match="NoSuchKey"):
            fetch.fetch("s3://models/absent.onnx", tmp_path, None, pvc_root=tmp_path)
    finally:
        server.stop()


def test_gcs_through_an_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    emulator = create_gcs_emulator("127.0.0.1", port, in_memory=True, default_bucket="models")
    emulator.start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
        client = storage.Client()
        client.bucket("models").blob("iris/model.onnx").upload_from_string(PAYLOAD)
        path = fetch.fetch("gs://models/iris/model.onnx", tmp_path, DIGEST, pvc_root=tmp_path)
        assert path.read_bytes() == PAYLOAD
    finally:
        emulator.stop()


def test_file_and_pvc(tmp_path: Path) -> None:
    claim = tmp_path / "pvc" / "model-store" / "iris"
    claim.mkdir(parents=True)
    (claim / "model.onnx").write_bytes(PAYLOAD)
    from_pvc = fetch.fetch(
        "pvc://model-store/iris/model.onnx", tmp_path / "a", DIGEST, pvc_root=tmp_path / "pvc"
    )
    assert from_pvc.read_bytes() == PAYLOAD
    from_file = fetch.fetch(
        f"file://{claim}/model.onnx", tmp_path / "b", DIGEST, pvc_root=tmp_path / "pvc"
    )
    assert from_file.read_bytes() == PAYLOAD
    with pytest.raises(fetch.FetchError, match="does not exist"):
        fetch.fetch("pvc://model-store/none.onnx", tmp_path / "c", None, pvc_root=tmp_path / "pvc")


def test_pvc_root_comes_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "claim").mkdir()
    (tmp_path / "claim" / "m.onnx").write_bytes(PAYLOAD)
    result = subprocess.run(
        runtime_command("fetch", "--uri", "pvc://claim/m.onnx", "--dest", str(tmp_path / "out")),
        capture_output=True,
        text=True,
        env={"MODELDEPLOY_PVC_ROOT": str(tmp_path), "MODELDEPLOY_SHA256": DIGEST},
        check=True,
    )
    assert result.stdout.strip() == str(tmp_path / "out" / "m.onnx")


def test_unsupported_scheme_is_named(tmp_path: Path) -> None:
    with pytest.raises(fetch.FetchError, match="unsupported URI scheme 'ftp'"):
        fetch.fetch("ftp://host/model.onnx", tmp_path, None, pvc_root=tmp_path)


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The same handler behind TLS, with a self-signed certificate for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = folder / "cert.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path = folder / "key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_port}", cert_path
    server.shutdown()


def test_an_https_download_never_follows_a_redirect_to_http(
    https_server: tuple[str, Path],
    http_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, cert = https_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    _Handler.redirect_to = f"{base}/models/model.onnx"
    assert fetch.fetch(f"{base}/redirect", tmp_path, DIGEST, pvc_root=tmp_path).exists()
    _Handler.redirect_to = f"{http_server}/models/model.onnx"
    with pytest.raises(fetch.FetchError, match="a redirect from https to http is refused"):
        fetch.fetch(f"{base}/redirect", tmp_path / "downgraded", DIGEST, pvc_root=tmp_path)
    assert not (tmp_path / "downgraded" / "redirect").exists()


def test_userinfo_authenticates_and_is_never_shown(http_server: str, tmp_path: Path) -> None:
    host = http_server.removeprefix("http://")
    uri = f"http://reader:s3cret%20pass@{host}/private/model.onnx"
    assert fetch.fetch(uri, tmp_path, DIGEST, pvc_root=tmp_path).read_bytes() == PAYLOAD
    # A failure's message, the log and the termination message carry no secret.
    result = subprocess.run(
        runtime_command("fetch", "--uri", uri.replace("model.onnx", "gone.onnx"), "--dest", "x"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr
    assert "s3cret" not in result.stderr and "reader" not in result.stderr
    # Whatever a library raises with the URI in it is scrubbed too.
    with pytest.raises(fetch.FetchError) as caught:
        fetch.fetch(
            "http://reader:s3cret@127.0.0.1:99999/m.onnx",
            tmp_path,
            None,
            pvc_root=tmp_path,
            attempts=1,
        )
    assert "s3cret" not in str(caught.value) and "reader" not in str(caught.value)


def test_pvc_and_file_paths_stay_inside_their_root(tmp_path: Path) -> None:
    claim = tmp_path / "pvc" / "store"
    claim.mkdir(parents=True)
    (claim / "model.onnx").write_bytes(PAYLOAD)
    (tmp_path / "secret.txt").write_text("not for you")
    (claim / "inside.onnx").symlink_to(claim / "model.onnx")
    (claim / "escape.onnx").symlink_to(tmp_path / "secret.txt")
    root = tmp_path / "pvc"
    assert fetch.fetch("pvc://store/inside.onnx", tmp_path / "a", DIGEST, pvc_root=root).exists()
    with pytest.raises(fetch.FetchError, match=r"'\.\.' segment"):
        fetch.fetch("pvc://store/../../secret.txt", tmp_path / "b", None, pvc_root=root)
    with pytest.raises(fetch.FetchError, match=r"'\.\.' segment"):
        fetch.fetch("pvc://store/%2e%2e/%2e%2e/secret.txt", tmp_path / "b", None, pvc_root=root)
    with pytest.raises(fetch.FetchError, match="leads outside"):
        fetch.fetch("pvc://store/escape.onnx", tmp_path / "c", None, pvc_root=root)
    with pytest.raises(fetch.FetchError, match=r"'\.\.' segment"):
        fetch.fetch(f"file://{claim}/../../secret.txt", tmp_path / "d", None, pvc_root=root)
    assert not (tmp_path / "b").exists() or list((tmp_path / "b").iterdir()) == []


def test_a_download_past_max_bytes_stops_and_is_not_retried(
    http_server: str, tmp_path: Path
) -> None:
    with pytest.raises(fetch.FetchError, match="larger than maxSizeBytes"):
        fetch.fetch(
            f"{http_server}/models/model.onnx",
            tmp_path,
            None,
            pvc_root=tmp_path,
            max_bytes=len(PAYLOAD) - 1,
        )
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_fails_at_once(tmp_path: Path) -> None:
    # /dev/full answers every write with ENOSPC, as a full volume does.
    with open("/dev/full", "wb", buffering=0) as full:
        sink = fetch._Sink(full, "http://h/m.onnx", None)
        with pytest.raises(fetch.FetchError, match="no space left"):
            sink.write(b"x" * 1024)


def test_a_failed_fetch_leaves_its_error_as_the_termination_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modeldeploy_runtime import cli

    log = tmp_path / "termination-log"
    log.write_text("")  # the kubelet creates it in every container
    monkeypatch.setattr(cli, "TERMINATION_LOG", log)
    missing = tmp_path / "missing.onnx"
    code = cli.main(["fetch", "--uri", f"file://{missing}", "--dest", str(tmp_path / "out")])
    assert code == 1
    message = log.read_text()
    assert "\n" not in message and str(missing) in message and "does not exist" in message


def test_outside_a_pod_no_termination_message_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modeldeploy_runtime import cli

    monkeypatch.setattr(cli, "TERMINATION_LOG", tmp_path / "absent")
    assert cli.main(["fetch", "--uri", "ftp://x/m.onnx", "--dest", str(tmp_path)]) == 1
    assert not (tmp_path / "absent").exists()

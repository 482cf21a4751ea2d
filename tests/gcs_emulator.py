"""A real GCS-compatible server on 127.0.0.1 for tests of gs:// paths.

It is the `gcp-storage-emulator` package: an HTTP server speaking the GCS JSON and upload
APIs, which the real clients gemb uses reach through their documented endpoint overrides
(gcsfs: STORAGE_EMULATOR_HOST; tensorstore, orbax's array store: TENSORSTORE_GCS_HTTP_URL).
Nothing is mocked: every byte goes over HTTP to that server and back.

Version 2026.7.19 of the package leaves out two parts of GCS that tensorstore relies on (its
OCDBT manifest is updated by compare-and-swap on object generations): downloads carry no
`x-goog-generation` header, and the generation preconditions (`ifGenerationMatch`,
`ifGenerationNotMatch`) are ignored. Run as a script, this module starts the package's server
with both added, as GCS documents them: 304 for a download whose generation is the one the
client has, 412 for a failed precondition.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager

BUCKET = "gemb-test"


def client_env(url: str) -> dict[str, str]:
    """The environment that points gemb's storage clients at the server at `url`."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        # The emulator needs no credentials; without this gcsfs would look for some.
        "FSSPEC_GCS_TOKEN": "anon",
        # gcsfs's newer client first asks the Storage Control gRPC API for the bucket type
        # (zonal / hierarchical), which the emulator does not serve (60 s timeouts per bucket).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_emulator(log_path):
    """Starts the server (in memory, with BUCKET created), yields its URL, stops it."""
    port = _free_port()
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, __file__, str(port)], stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the GCS emulator exited ({server.returncode}); see "
                                       f"{log_path}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the GCS emulator did not listen on port {port} "
                                           f"within 60 s; see {log_path}") from None
                    time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


def upload_folder(local, remote) -> None:
    """Copies a local folder to a gs:// path, file by file, through gemb's path library."""
    from gemb import paths

    local, remote = paths.as_path(local), paths.as_path(remote)
    for file in paths.files_under(local):
        target = remote / file.relative_to(local)
        target.write_bytes(file.read_bytes())


def _add_generations_to_the_emulator() -> None:
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def generation_of(storage, bucket, name):
        try:
            return storage.get_file_obj(bucket, name)["generation"]
        except NotFound:
            return None

    def precondition_failed(request, current) -> bool:
        wanted = request.query.get("ifGenerationMatch")
        if wanted is not None and wanted[0] != (current or "0"):
            return True
        unwanted = request.query.get("ifGenerationNotMatch")
        return unwanted is not None and unwanted[0] == (current or "0") and current is not None

    original_download, original_insert = objects.download, objects.insert

    def download(request, response, storage, *args, **kwargs):
        current = generation_of(storage, request.params["bucket_name"],
                                request.params["object_id"])
        if current is not None:
            if request.query.get("ifGenerationNotMatch", [None])[0] == current:
                response.status = HTTPStatus.NOT_MODIFIED
                response["x-goog-generation"] = current
                return None
            if precondition_failed(request, current):
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
            response["x-goog-generation"] = current
            response["x-goog-metageneration"] = "1"
        return original_download(request, response, storage, *args, **kwargs)

    def insert(request, response, storage, *args, **kwargs):
        name = request.query.get("name", [None])[0]
        if name is not None and precondition_failed(
                request, generation_of(storage, request.params["bucket_name"], name)):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        return original_insert(request, response, storage, *args, **kwargs)

    objects.download, objects.insert = download, insert
    replacements = {original_download: download, original_insert: insert}
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            handlers[method] = replacements.get(handler, handler)


if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    _add_generations_to_the_emulator()
    main(["start", "--host", "127.0.0.1", "--port", sys.argv[1], "--in-memory",
          "--default-bucket", BUCKET])

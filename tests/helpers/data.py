"""Shared helpers for the data/metrics tests (fixtures are imported by the test modules)."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.runs import BENCHMARK_DIR as BENCHMARKS

requires_shared = pytest.mark.skipif(not (BENCHMARKS / "Set5" / "HR").is_dir(),
                                     reason=f"benchmark images not found at {BENCHMARKS} (set DLSN_TEST_SHARED)")


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random uint8 RGB image (unique content: every patch occurs once)."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """The bundled sample set written once per test session."""
    from dlsn.data.sample import prepare_sample

    root = tmp_path_factory.mktemp("sample")
    prepare_sample(root)
    return root


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static file server with single-range ``Range: bytes=N-`` support (optionally ignored)."""

    ignore_range = False
    requests_seen: list = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        type(self).requests_seen.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        header = self.headers.get("Range")
        if header and not self.ignore_range:
            start = int(header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_folder(folder: Path, ignore_range: bool = False):
    """Start a threaded HTTP server for ``folder``; returns (base_url, handler_class, server)."""
    handler = type("Handler", (RangeHandler,), {"ignore_range": ignore_range, "requests_seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/", handler, server

"""Serve a shard directory over HTTP with byte ranges, on the loopback address: for trying remote shards
(`data.shards_dir: http://127.0.0.1:PORT`), for the tests of remote reads, and for the loader benchmark,
with an added round-trip latency and injected connection drops.

  python tests/shard_server.py DIR [--port 8000] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Server:
    """A directory over HTTP/1.1 with byte ranges on 127.0.0.1 (a context manager; `url` once started).
    `latency_ms`: added before every response (a remote store's round trip); `drop` = {file name: bytes}
    cuts the first GET of that file that reaches past those bytes after sending them (once),
    `always_drop` cuts every GET; `flip` = {file name: [byte offsets]} serves those bytes inverted (a
    damaged or stale copy, every time); `gets` records (file name, Range header) of every GET."""

    def __init__(self, root: Path, latency_ms: float = 0.0, port: int = 0):
        self.root, self.drop, self.always_drop, self.dropped, self.gets = Path(root), {}, False, [], []
        self.flip: dict[str, list[int]] = {}
        self.latency_ms = latency_ms
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _file(self):
                path = server.root / self.path.lstrip("/")
                return path if path.is_file() else None

            def do_HEAD(self):
                path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(path.stat().st_size))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self):
                if server.latency_ms:
                    time.sleep(server.latency_ms / 1000)
                path = self._file()
                if path is None:
                    self.send_error(404)
                    return
                size = path.stat().st_size
                start, end = 0, size
                rng = self.headers.get("Range")
                server.gets.append((path.name, rng))
                if rng:
                    a, b = rng.split("=")[1].split("-")
                    start, end = int(a), min(size, int(b) + 1 if b else size)
                with open(path, "rb") as f:  # the range only, as an object store serves it
                    f.seek(start)
                    body = f.read(end - start)
                flips = [o - start for o in server.flip.get(path.name, ()) if start <= o < end]
                if flips:  # a damaged copy: these bytes are served inverted
                    body = bytearray(body)
                    for o in flips:
                        body[o] ^= 0xFF
                    body = bytes(body)
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.end_headers()
                cut = server.drop.get(path.name)
                if server.always_drop or (cut is not None and start <= cut < end):
                    server.drop.pop(path.name, None)
                    server.dropped.append((path.name, start))
                    self.wfile.write(body[: max(1, (cut or start) - start)][: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--latency-ms", type=float, default=0.0)
    args = p.parse_args(argv)
    srv = Server(args.dir, args.latency_ms, port=args.port)
    print(f"serving {args.dir} at {srv.url}", flush=True)
    srv.httpd.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

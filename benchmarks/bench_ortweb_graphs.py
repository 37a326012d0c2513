"""The browser decoder's graphs alone in Chromium: median and fastest run of MobileSAM's
``prompt.onnx`` and ``decoder.onnx`` in onnxruntime-web (WebAssembly), in a page that does
nothing else, on random inputs of the real shapes.

``--compare-convolutions`` also exports the graphs with the mask decoder's upscaling as
transposed convolutions (``MaskDecoder.upscale_as_products`` off, the form before
2026-12-08) and runs both in the same page, alternating. onnxruntime-web sets its
thread count once per page, so each ``--threads`` value gets its own page. ``--native``
also runs the same graphs with onnxruntime's Python package (its native CPU build) on the
same inputs' shapes and thread counts.

    .venv/bin/python benchmarks/bench_ortweb_graphs.py --threads 2 1 --compare-convolutions
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.engine.helpers import CHROMIUM_ARGS, chromium_path, free_port  # noqa: E402

PAGE = """<!doctype html><html><body><script src="/ort/ort.wasm.min.js"></script><script>
const SHAPES = {keys: [1, 4096, 256], k: [1, 4096, 128], v: [1, 4096, 128],
  q: [1, 4096, 128], image_embeddings: [1, 256, 64, 64], mask_input: [1, 1, 256, 256]};
function random(shape) {
  const n = shape.reduce((a, b) => a * b, 1), a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.random() * 2 - 1;
  return new ort.Tensor("float32", a, shape);
}
async function start(threads) {
  ort.env.wasm.wasmPaths = "/ort/";
  ort.env.wasm.numThreads = threads;
}
async function session(name) {
  const buf = await (await fetch("/graphs/" + name)).arrayBuffer();
  const s = await ort.InferenceSession.create(buf,
    {executionProviders: ["wasm"], graphOptimizationLevel: "all"});
  const feeds = {
    point_coords: new ort.Tensor("float32", Float32Array.from([300, 200, 0, 0]), [1, 2, 2]),
    point_labels: new ort.Tensor("float32", Float32Array.from([1, -1]), [1, 2]),
    has_mask_input: new ort.Tensor("float32", Float32Array.from([1]), [1]),
  };
  for (const n of Object.keys(feeds)) if (!s.inputNames.includes(n)) delete feeds[n];
  for (const n of s.inputNames) if (!(n in feeds)) feeds[n] = random(SHAPES[n]);
  for (let i = 0; i < 3; i++) await s.run(feeds);
  return {s, feeds, times: []};
}
async function time(x) {
  const t = performance.now();
  await x.s.run(x.feeds);
  x.times.push(performance.now() - t);
}
</script></body></html>"""


def serve(runtime: Path, graphs: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {
            ".mjs": "text/javascript",
            ".js": "text/javascript",
            ".wasm": "application/wasm",
            ".onnx": "application/octet-stream",
        }

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path in ("/", "/index.html"):
                body = PAGE.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def translate_path(self, path: str) -> str:
            path = path.split("?")[0]
            for prefix, folder in (("/ort/", runtime), ("/graphs/", graphs)):
                if path.startswith(prefix) and "/" not in path[len(prefix) :]:
                    return str(folder / path[len(prefix) :])
            return str(graphs / "missing")

        def end_headers(self) -> None:  # cross-origin isolated: WebAssembly threads
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            super().end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


async def measure(url: str, threads: int, names: list[str], runs: int) -> dict[str, list[float]]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True
        )
        page = await browser.new_page()
        await page.goto(url)
        if not await page.evaluate("self.crossOriginIsolated"):
            raise SystemExit("the page is not cross-origin isolated: no WebAssembly threads")
        await page.evaluate(f"start({threads})")
        await page.evaluate(
            "async (names) => { window.S = {}; for (const n of names) S[n] = await session(n); }",
            names,
        )
        for _ in range(runs):  # alternating, so that a slow spell hits every graph alike
            for n in names:
                await page.evaluate("(n) => time(S[n])", n)
        times = await page.evaluate("(names) => names.map((n) => S[n].times)", names)
        await browser.close()
    return dict(zip(names, times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--compare-convolutions", action="store_true")
    ap.add_argument("--native", action="store_true", help="also onnxruntime's native build")
    args = ap.parse_args()

    from segany import load_predictor
    from segany.engine import ortweb
    from segany.export.onnx import export_decoder, export_prompt

    if not ortweb.available():
        raise SystemExit("onnxruntime-web is not in the cache: run `make web-runtime`")
    model = load_predictor("mobile_sam", backend="torch").model
    with tempfile.TemporaryDirectory() as tmp:
        graphs = Path(tmp)
        export_prompt(model, graphs / "prompt-products.onnx")
        export_decoder(model, graphs / "decoder-products.onnx")
        names = ["prompt-products.onnx", "decoder-products.onnx"]
        if args.compare_convolutions:
            _export_as_convolutions(model, graphs)
            names += ["prompt-convolutions.onnx", "decoder-convolutions.onnx"]
        server, url = serve(ortweb.ort_dir(), graphs)
        try:
            print("| graph | WebAssembly threads | runs | median ms | fastest ms |")
            print("|---|---|---|---|---|")
            for th in args.threads:
                times = asyncio.run(measure(url, th, names, args.runs))
                for n in names:
                    t = sorted(times[n])
                    print(f"| {n} | {th} | {len(t)} | {t[len(t) // 2]:.1f} | {t[0]:.1f} |")
                if args.native:
                    for n, t in native(graphs, names, th, args.runs).items():
                        print(
                            f"| {n}, native | {th} | {len(t)} | {t[len(t) // 2]:.1f} | {t[0]:.1f} |"
                        )
        finally:
            server.shutdown()
    return 0


def native(graphs: Path, names: list[str], threads: int, runs: int) -> dict[str, list[float]]:
    """The same graphs in onnxruntime's native CPU build, sorted times in ms."""
    import time

    import numpy as np
    import onnxruntime as ort

    shapes = {"keys": (1, 4096, 256), "k": (1, 4096, 128), "v": (1, 4096, 128),
              "q": (1, 4096, 128), "image_embeddings": (1, 256, 64, 64),
              "mask_input": (1, 1, 256, 256)}  # fmt: skip
    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sessions = {}
    for n in names:
        s = ort.InferenceSession(str(graphs / n), opts, providers=["CPUExecutionProvider"])
        feeds = {
            "point_coords": np.array([[[300, 200], [0, 0]]], np.float32),
            "point_labels": np.array([[1, -1]], np.float32),
            "has_mask_input": np.ones(1, np.float32),
        }
        inputs = [i.name for i in s.get_inputs()]
        feeds = {k: v for k, v in feeds.items() if k in inputs}
        for k in inputs:
            if k not in feeds:
                feeds[k] = rng.uniform(-1, 1, shapes[k]).astype(np.float32)
        for _ in range(3):
            s.run(None, feeds)
        sessions[n] = (s, feeds, [])
    for _ in range(runs):
        for s, feeds, times in sessions.values():
            t = time.perf_counter()
            s.run(None, feeds)
            times.append(1000 * (time.perf_counter() - t))
    return {n: sorted(times) for n, (_, _, times) in sessions.items()}


def _export_as_convolutions(model, graphs: Path) -> None:
    """The graphs as exported before the products form: the export's copy of the model
    gets ``upscale_as_products`` switched back off."""
    from segany.export import onnx as export
    from segany.models.mask_decoder import MaskDecoder

    prepared = export._prepared

    @functools.wraps(prepared)
    def convolutions(sam):
        copy = prepared(sam)
        for m in copy.modules():
            if isinstance(m, MaskDecoder):
                m.upscale_as_products = False
        return copy

    export._prepared = convolutions
    try:
        export.export_prompt(model, graphs / "prompt-convolutions.onnx")
        export.export_decoder(model, graphs / "decoder-convolutions.onnx")
    finally:
        export._prepared = prepared


if __name__ == "__main__":
    raise SystemExit(main())

"""Click-to-paint in Chromium: the browser decoder (onnxruntime-web in the page) against the
server path (``?decoder=server``), with 1 page and with N pages at once.

A ``segany annotate`` server (MobileSAM, torch) runs in its own process on two images
(``examples/kitchen.jpg`` and the golden coffee image), embedded before the timed runs.
Each page is its own browser context in the system Chromium (headless) and works like an
annotator: a click on a random point of the image (three candidates), a second click
that refines the chosen mask (the mask passed back as the mask input), Esc, with 0.3-0.8 s
of think time between clicks; the timed clicks start once every page has loaded. The
latency is the page's own: mousedown to the frame that paints the mask (``S.latencies``,
shown in the status bar), queueing included. CPU per click: the Chromium processes' and
the server's CPU time over the timed clicks, divided by their number.

    .venv/bin/python benchmarks/bench_webdecoder.py                 # 1 page, then 8
    .venv/bin/python benchmarks/bench_webdecoder.py --pages 1 --clicks 20 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.engine.helpers import CHROMIUM_ARGS, chromium_path, free_port, wait_http  # noqa: E402


def start_server(images: Path, work: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "segany", "annotate", str(images), "--db",
           f"sqlite:///{work / 'bench.db'}", "--port", str(port), "--cache-dir",
           str(work / "cache"), "--backend", "torch", "--log-level", "warning", *extra]  # fmt: skip
    log = open(work / "server.log", "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/api/health", timeout=180, proc=proc)
    return proc, base


async def annotator(
    ctx,
    url: str,
    clicks: int,
    seed: int,
    ready: asyncio.Event,
    go: asyncio.Event,
    finished: asyncio.Event,
    close: asyncio.Event,
    warmup: int,
) -> dict:
    page = await ctx.new_page()
    await page.set_viewport_size({"width": 1200, "height": 800})
    t0 = time.perf_counter()
    await page.goto(url)
    await page.wait_for_function("S.img !== null")
    local = await page.evaluate("S.decoder")
    if local:
        await page.evaluate("wdImage(S.current.id)")
    start_s = time.perf_counter() - t0
    rng = random.Random(seed)
    w, h = await page.evaluate("[S.current.width, S.current.height]")
    box = await page.locator("#canvas").bounding_box()

    async def click(x: float, y: float, button: str = "left") -> None:
        sx, sy = await page.evaluate(f"toScreen({x}, {y})")
        n = await page.evaluate("S.latencies.length")
        await page.mouse.click(box["x"] + sx, box["y"] + sy, button=button)
        await page.wait_for_function(f"S.latencies.length > {n}", timeout=120_000)

    for i in range(warmup):  # not counted: the first runs of the graphs, wasm tier-up
        await click(w * (0.3 + 0.1 * i), h / 2)
        await click(w * (0.3 + 0.1 * i) + 10, h / 2, button="right")
        await page.keyboard.press("Escape")
    await page.evaluate("S.latencies = []")
    ready.set()
    await go.wait()  # every page loaded: the timed clicks do not overlap another's start
    done = 0
    while done < clicks:
        x, y = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
        await click(x, y)
        done += 1
        await asyncio.sleep(rng.uniform(0.3, 0.8))
        if done < clicks:
            await click(min(w - 1, x + rng.uniform(10, 40)), y, button="right")
            done += 1
            await asyncio.sleep(rng.uniform(0.3, 0.8))
        await page.keyboard.press("Escape")
    lat = await page.evaluate("S.latencies")
    threads = await page.evaluate("WD.threads")
    finished.set()
    await close.wait()  # the CPU times are read while every page's processes still run
    await page.close()
    return {"lat": lat, "local": local, "start_s": start_s, "threads": threads}


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds used so far by process ``pid``, or by all the Chromium processes on
    this machine (Linux /proc)."""
    total = 0
    pids = [str(pid)] if pid else filter(str.isdigit, os.listdir("/proc"))
    for p in pids:
        try:
            if pid is None and b"chrom" not in Path(f"/proc/{p}/cmdline").read_bytes():
                continue
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


async def run(base: str, pages: int, clicks: int, query: str, server_pid: int, warmup: int) -> dict:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True
        )
        ctxs = [await browser.new_context() for _ in range(pages)]
        events = [asyncio.Event() for _ in range(pages)]
        finished = [asyncio.Event() for _ in range(pages)]
        go, close = asyncio.Event(), asyncio.Event()
        hashes = ["#image=1", "#image=2"]
        t0 = time.perf_counter()
        tasks = [
            asyncio.ensure_future(
                annotator(
                    c,
                    f"{base}/{query}{hashes[i % 2]}",
                    clicks,
                    i,
                    events[i],
                    go,
                    finished[i],
                    close,
                    warmup,
                )
            )
            for i, c in enumerate(ctxs)
        ]
        await asyncio.gather(*[e.wait() for e in events])
        cpu0, server0, t1 = cpu_s(), cpu_s(server_pid), time.perf_counter()
        go.set()
        await asyncio.gather(*[e.wait() for e in finished])
        browser_cpu, server_cpu = cpu_s() - cpu0, cpu_s(server_pid) - server0
        clicking = time.perf_counter() - t1
        close.set()
        res = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        await browser.close()
    lat = np.array([x["ms"] for r in res for x in r["lat"]])
    compute = np.array([x["compute"] for r in res for x in r["lat"]])
    local = {x["local"] for r in res for x in r["lat"]}
    return {
        "pages": pages,
        "path": "browser" if local == {True} else "server" if local == {False} else "mixed",
        "threads": res[0]["threads"],
        "clicks": int(lat.size),
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "max": float(lat.max()),
        "compute_p50": float(np.percentile(compute, 50)),
        "start_s": float(np.mean([r["start_s"] for r in res])),
        "wall_s": wall,
        "clicking_s": clicking,
        # the browser's processes' CPU time per timed click (page, renderer, decoder)
        "browser_cpu_ms": 1000 * browser_cpu / max(1, int(lat.size)),
        "server_cpu_ms": 1000 * server_cpu / max(1, int(lat.size)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--clicks", type=int, default=12, help="clicks per page (default 12)")
    ap.add_argument("--threads", type=int, default=0, help="WebAssembly threads (0: the page's)")
    ap.add_argument("--modes", nargs="+", default=["browser", "server"])
    ap.add_argument(
        "--warmup", type=int, default=3, help="untimed click pairs per page first (default 3)"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-webdec-"))
    images = work / "images"
    images.mkdir()
    shutil.copy(ROOT / "examples" / "kitchen.jpg", images / "a-kitchen.jpg")
    z = np.load(ROOT / "tests" / "data" / "golden_coffee_small.npz")
    Image.fromarray(z["image"]).save(images / "b-coffee.png")
    proc, base = start_server(images, work, ["--no-prefetch", "--web-decoder"])
    rows = []
    try:
        for iid in (1, 2):  # embedded before the timed runs
            httpx.get(f"{base}/api/images/{iid}/embedding", timeout=300)
        for n in args.pages:
            for mode in args.modes:
                q = "?decoder=server" if mode == "server" else "?"
                if mode == "browser" and args.threads:
                    q += f"threads={args.threads}"
                rows.append(asyncio.run(run(base, n, args.clicks, q, proc.pid, args.warmup)))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    print("| pages | decoder | wasm threads | clicks | p50 ms | p95 ms | max ms | "
          "decode p50 ms | CPU per click ms, browser + server | page start s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        th = r["threads"] if r["path"] == "browser" else "-"
        print(f"| {r['pages']} | {r['path']} | {th} | {r['clicks']} | {r['p50']:.0f} | "
              f"{r['p95']:.0f} | {r['max']:.0f} | {r['compute_p50']:.0f} | "
              f"{r['browser_cpu_ms']:.0f} + {r['server_cpu_ms']:.0f} | "
              f"{r['start_s']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

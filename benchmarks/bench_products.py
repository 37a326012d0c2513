"""Float32 matrix products through torch's BLAS (MKL on x86) against oneDNN, on this CPU:
whether :func:`segany.runtime.prefer_onednn_products` is right here (on AMD CPUs with
AVX-512, MKL runs its AVX2 code and oneDNN is about twice as fast; capped to AVX2, oneDNN
is 7-14% faster).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_products.py [--threads 1] [--attention]

GFLOP/s per shape, process time (so load from other jobs moves it little at one thread).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _gflops(fn, flop: float, reps: int) -> float:
    fn()
    t = time.process_time()
    for _ in range(reps):
        fn()
    return flop * reps / (time.process_time() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attention", action="store_true", help="also SAM 2's memory attention")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from segany.models.fuse import ONEDNN_PRODUCTS, onednn_available
    from segany.runtime import cpu_info, prefer_onednn_products

    info = cpu_info()
    print(f"CPU: {info['model']} ({info['vendor'] or 'vendor unknown'}, {info['arch']}); "
          f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()} kernels; "
          f"{args.threads} thread(s)")  # fmt: skip
    print(f"prefer_onednn_products: {prefer_onednn_products()}")
    if not onednn_available():
        print("no oneDNN in this torch")
        return
    # (name, a, w): the product a @ w.T
    r = torch.randn
    shapes = [
        ("square 2048^3", r(2048, 2048), r(2048, 2048), 3),
        ("linear 4096x256 by 256x256", r(4096, 256), r(256, 256), 100),
        ("few-token scores 56x256 by 256x4096", r(56, 256), r(4096, 256), 100),
        ("few-token values 56x4096 by 4096x256", r(56, 4096), r(4096, 256).t(), 100),
    ]
    print(f"{'product':40s} {'BLAS':>8s} {'oneDNN':>8s}  GFLOP/s")
    with torch.inference_mode():
        for name, a, w, reps in shapes:
            flop = 2.0 * a.shape[0] * a.shape[1] * w.shape[0]
            blas = _gflops(lambda a=a, w=w: F.linear(a, w), flop, reps)
            dnn = _gflops(lambda a=a, w=w: ONEDNN_PRODUCTS.linear(a, w), flop, reps)
            print(f"{name:40s} {blas:8.0f} {dnn:8.0f}  ({dnn / blas:.2f}x)")
    if args.attention:
        _memory_attention()


def _memory_attention() -> None:
    """One SAM 2 memory cross-attention (4,096 frame tokens against 7 memories of 4,096
    tokens and 16 pointer tokens, 64 channels) in its three forms."""
    from segany.models.common import Products
    from segany.models.memory import RoPEAttention

    torch.manual_seed(0)
    m = 7 * 4096 + 16
    q, kv = torch.randn(1, 4096, 256), torch.randn(1, m, 64)
    forms = [
        ("float32, fused kernel", torch.float32, Products()),
        ("bfloat16, fused kernel", torch.bfloat16, Products(fused_bf16=True)),
        ("bfloat16, chunked products", torch.bfloat16, Products(fused_bf16=False)),
    ]
    print("SAM 2 memory cross-attention, CPU ms per call:")
    with torch.inference_mode():
        for name, dtype, products in forms:
            attn = RoPEAttention(embedding_dim=256, kv_in_dim=64).to(dtype).eval()
            attn.products = products
            x, y = q.to(dtype), kv.to(dtype)
            for i in range(3):  # the first call warms up
                if i == 1:
                    t = time.process_time()
                attn(x, y, y, size=(64, 64), num_k_exclude_rope=16)
            print(f"  {name:30s} {(time.process_time() - t) / 2 * 1e3:8.0f}")


if __name__ == "__main__":
    main()

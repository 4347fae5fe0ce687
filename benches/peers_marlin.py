#!/usr/bin/env python3
"""Peers for benches/marlin.rs: the same GEMM shapes timed with PyTorch on the same GPU.

* torch.matmul in bf16 (cuBLAS): X[M, K] @ W[K, N]
* torch._weight_int4pack_mm (tinygemm, INT4 weights, bf16 activations, group 128/32), weights
  packed with torch.ops.aten._convert_weight_to_int4pack.

CUDA-event timing; weight buffers rotate through > 60 MB so weights come from HBM, like the Rust
bench. Prints a markdown table; compare with `cargo bench --bench marlin` from the same run.
Usage: python3 benches/peers_marlin.py [--iters N]
"""
import argparse
import sys

try:
    import torch
except ImportError:  # pragma: no cover
    print("peers_marlin: skipped (PyTorch not installed)")
    sys.exit(0)

SHAPES = [
    ("4096x4096 g128", 4096, 4096, 128),
    ("28672x8192 g128 (llama70b up)", 28672, 8192, 128),
    ("8192x28672 g128 (llama70b down)", 8192, 28672, 128),
    ("qwen3 expert 1536x2048 g128", 1536, 2048, 128),
    ("qwen3 expert 2048x768 g128", 2048, 768, 128),
    ("kimi expert 4096x7168 g32", 4096, 7168, 32),
    ("kimi expert 7168x2048 g32", 7168, 2048, 32),
]
MS = [1, 16, 64, 256, 1024, 4096]
ROTATE_BYTES = 256 << 20


def time_ms(fn, iters):
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / iters)
    return best


def copy_tbps():
    n = 1 << 29
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = time_ms(lambda: dst.copy_(src), 10)
    return 2 * n / (ms / 1e3) / 1e12


def int4_pack(n, k, group, device):
    """Random INT4 weights in tinygemm's packed form plus scales_and_zeros [K/g, N, 2]."""
    w_int = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device)
    packed_u8 = (w_int[:, ::2] << 4 | w_int[:, 1::2]).to(torch.uint8)
    inner_k_tiles = 8 if k % 1024 == 0 else (4 if k % 512 == 0 else 2)
    packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, inner_k_tiles)
    sz = torch.empty(k // group, n, 2, dtype=torch.bfloat16, device=device)
    sz[..., 0].uniform_(0.004, 0.02)
    sz[..., 1].fill_(0)
    return packed, sz


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=0, help="iterations per timing (0: by size)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("peers_marlin: skipped (no CUDA device)")
        return
    dev = torch.device("cuda")
    bw = copy_tbps()
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}; copy {bw:.2f} TB/s (read + write)")
    print("| shape (N x K) | M | cuBLAS bf16 us | cuBLAS TFLOP/s | tinygemm us | tinygemm TFLOP/s | int4 roofline us |")
    print("|---|---|---|---|---|---|---|")
    for name, n, k, group in SHAPES:
        bf16_bytes = n * k * 2
        nb = max(2, min(16, -(-ROTATE_BYTES // bf16_bytes)))
        w_bf16 = [torch.randn(k, n, dtype=torch.bfloat16, device=dev) * 0.02 for _ in range(nb)]
        int4_bytes = n * k // 2 + (k // group) * n * 2
        ni = max(2, min(32, -(-ROTATE_BYTES // int4_bytes)))
        try:
            w_int4 = [int4_pack(n, k, group, dev) for _ in range(ni)]
        except Exception as e:  # tinygemm availability differs by build / arch
            print(f"tinygemm unavailable for {name}: {e}")
            w_int4 = None
        for m in MS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            flops = 2.0 * m * n * k
            iters = args.iters or int(max(5, min(200, 2e6 / max(1.0, m * n * k / 1e6))))
            i = [0]

            def mm():
                torch.matmul(x, w_bf16[i[0] % nb])
                i[0] += 1

            mm()
            t_mm = time_ms(mm, iters) / 1e3
            t_tg = float("nan")
            if w_int4 is not None:
                j = [0]

                def tg():
                    p, sz = w_int4[j[0] % ni]
                    torch._weight_int4pack_mm(x, p, group, sz)
                    j[0] += 1

                try:
                    tg()
                    t_tg = time_ms(tg, iters) / 1e3
                except Exception as e:
                    print(f"tinygemm failed for {name} M={m}: {e}")
            roof = int4_bytes / (bw * 1e12)
            print(
                f"| {name} | {m} | {t_mm * 1e6:.1f} | {flops / t_mm / 1e12:.1f} | "
                f"{t_tg * 1e6:.1f} | {flops / t_tg / 1e12:.1f} | {roof * 1e6:.1f} |"
            )
        del w_bf16, w_int4
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

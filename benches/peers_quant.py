#!/usr/bin/env python3
"""Peers for benches/quant.rs: the same fake-quant work written with torch ops (slime's formula:
per-group amax / 7, clamp to 1e-5, round half to even, clamp to [-7, 7], multiply back), timed
with CUDA events on the same shapes, plus torch's own device-to-device copy bandwidth.

Run on the GPU machine in the same invocation as the Rust bench:
    bash .gpu/run.sh --benches && python3 benches/peers_quant.py
"""
import torch

SHAPES = [
    ("dense 7168x18432 g128", 7168, 18432, 128),
    ("kimi w13 4096x7168 g32", 4096, 7168, 32),
    ("kimi w2 7168x2048 g32", 7168, 2048, 32),
    ("llama 8192x8192 channelwise", 8192, 8192, 8192),
]
ROTATE_BYTES = 512 << 20


def fake_quant_torch(w: torch.Tensor, g: int) -> torch.Tensor:
    n, k = w.shape
    x = w.view(n, k // g, g).float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / 7.0).clamp(min=1e-5)
    scale = scale.to(w.dtype).float()  # the stored BF16 scale, as lowbit and the rollout use
    q = torch.round(x / scale).clamp(-7, 7)
    return (q * scale).to(w.dtype).view(n, k)


def timed(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main():
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    n = 1 << 29
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = timed(lambda i=0: b.copy_(a))
    copy = 2 * n / t / 1e9
    print(f"torch device-to-device copy: {copy:.0f} GB/s (read + write)")
    print("| shape | torch fake-quant µs | GB/s | of copy bw |")
    print("|---|---|---|---|")
    for name, rows, k, g in SHAPES:
        w0 = torch.randn(rows, k, device=dev, dtype=torch.bfloat16) * 0.02
        nbuf = max(2, min(8, ROTATE_BYTES // w0.numel() // 2))
        bufs = [w0.clone() for _ in range(nbuf)]
        t = timed(lambda i=0: fake_quant_torch(bufs[i % nbuf], g))
        bytes_moved = 2 * w0.numel() * 2
        gbs = bytes_moved / t / 1e9
        print(f"| {name} | {t * 1e6:.1f} | {gbs:.0f} | {100 * gbs / copy:.0f}% |")


if __name__ == "__main__":
    main()

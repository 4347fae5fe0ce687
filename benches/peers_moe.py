#!/usr/bin/env python3
"""Same-run PyTorch peers for benches/moe.rs (DESIGN §6), on the GPU machine.

For the Qwen3-30B-A3B (E=128, top-8, H=2048, I=768, g=128) and Kimi-K2 (E=384, top-8, H=7168,
I=2048, g=32) MoE layers x M in {1, 16, 64, 256, 2048}, times with torch.cuda.Event:
  * bf16 per-expert loop: for every routed expert, gather its tokens, x @ w13^T, silu(gate)*up,
    @ w2^T, times the router weight, index_add into the output (cuBLAS bf16);
  * tinygemm per expert: the same loop with torch._weight_int4pack_mm (INT4 weights, bf16
    activations; group size as in the layer) when the op is available.
and moe_align_block_size-equivalent sorting for M=4096, top-8, E=384 (torch.sort based).
Reports time and TB/s of the touched expert weights (bf16 bytes for the bf16 loop, INT4 + scale
bytes for tinygemm), so the numbers line up with `cargo bench --bench moe`.

Kimi-K2's full bf16 stack (384 x 44M weights = 34 GB) is allocated only when it fits in memory;
otherwise only the routed experts' weights are materialised (timing is the same: the loop only
touches routed experts).
"""
import sys

try:
    import torch
except ImportError:
    print("peers_moe: skipped (no torch)")
    sys.exit(0)

if not torch.cuda.is_available():
    print("peers_moe: skipped (no CUDA device)")
    sys.exit(0)

DEV = "cuda"
ITERS = 20
ROUTINGS = 4


def timed(fn, iters=ITERS):
    fn(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def routing(m, topk, e, gen):
    logits = torch.randn(m, e, device=DEV, generator=gen)
    w, ids = torch.topk(torch.softmax(logits, dim=-1), topk, dim=-1)
    return w / w.sum(-1, keepdim=True), ids.to(torch.int32)


def moe_loop(x, w, ids, experts_fn, out):
    out.zero_()
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=0).tolist()
    topk = ids.shape[1]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        slots = order[start:start + c]
        start += c
        tok = slots // topk
        y = experts_fn(e, x[tok]) * w.flatten()[slots, None].to(x.dtype)
        out.index_add_(0, tok, y)
    return out


def bench_layer(name, e, topk, h, i, g):
    gen = torch.Generator(device=DEV)
    gen.manual_seed(0)
    full_bytes = e * 3 * h * i * 2
    free, _ = torch.cuda.mem_get_info()
    materialise_all = full_bytes < 0.6 * free
    cache = {}

    def bf16_weights(ex):
        key = ex if materialise_all else ex % 64
        if key not in cache:
            w13 = torch.randn(2 * i, h, device=DEV, dtype=torch.bfloat16) / 10
            w2 = torch.randn(h, i, device=DEV, dtype=torch.bfloat16) / 10
            cache[key] = (w13, w2)
        return cache[key]

    def bf16_expert(ex, xs):
        w13, w2 = bf16_weights(ex)
        gu = xs @ w13.t()
        act = torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]
        return act @ w2.t()

    have_tinygemm = hasattr(torch.ops.aten, "_weight_int4pack_mm")
    tcache = {}

    def tiny_weights(ex):
        key = ex % 64
        if key not in tcache:
            def pack(n, k):
                q = torch.randint(0, 16, (n, k), device=DEV, dtype=torch.int32)
                try:
                    packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
                except Exception:
                    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
                sz = torch.rand(k // g, n, 2, device=DEV, dtype=torch.bfloat16) / 50
                return packed, sz
            tcache[key] = (pack(2 * i, h), pack(h, i))
        return tcache[key]

    def tiny_expert(ex, xs):
        (p13, s13), (p2, s2) = tiny_weights(ex)
        gu = torch.ops.aten._weight_int4pack_mm(xs, p13, g, s13)
        act = torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]
        return torch.ops.aten._weight_int4pack_mm(act.contiguous(), p2, g, s2)

    for m in [1, 16, 64, 256, 2048]:
        x = torch.randn(m, h, device=DEV, dtype=torch.bfloat16, generator=gen) / 10
        out = torch.empty_like(x)
        routes = [routing(m, topk, e, gen) for _ in range(ROUTINGS)]
        touched = sum(len(torch.unique(r[1])) for r in routes) / ROUTINGS
        t = timed(lambda it: moe_loop(x, *routes[it % ROUTINGS], bf16_expert, out))
        bytes_bf16 = touched * 3 * h * i * 2
        line = f"{name:<14} M={m:>5}: bf16 loop {t * 1e6:>10.1f} us {bytes_bf16 / t / 1e12:>6.2f} TB/s"
        if have_tinygemm:
            try:
                tt = timed(lambda it: moe_loop(x, *routes[it % ROUTINGS], tiny_expert, out))
                bytes_int4 = touched * (3 * h * i // 2 + 3 * h * i // g * 4)
                line += f" | tinygemm loop {tt * 1e6:>10.1f} us {bytes_int4 / tt / 1e12:>6.2f} TB/s"
            except Exception as exc:  # layout/version differences between torch releases
                line += f" | tinygemm: unavailable ({type(exc).__name__}: {exc})"
        print(line, flush=True)


def bench_align():
    m, topk, e = 4096, 8, 384
    gen = torch.Generator(device=DEV)
    gen.manual_seed(1)
    ids = routing(m, topk, e, gen)[1].flatten()

    def sort_like_align(_):
        order = torch.sort(ids, stable=True)
        counts = torch.bincount(ids, minlength=e)
        return order, torch.cumsum(counts, 0)

    t = timed(sort_like_align, 200)
    print(f"torch stable sort + bincount (align peer) M={m} top{topk} E={e}: {t * 1e6:.2f} us")


if __name__ == "__main__":
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    bench_align()
    bench_layer("Qwen3-30B-A3B", 128, 8, 2048, 768, 128)
    bench_layer("Kimi-K2", 384, 8, 7168, 2048, 32)

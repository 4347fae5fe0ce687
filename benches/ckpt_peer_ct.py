#!/usr/bin/env python3
"""compressed-tensors' own conversion of a BF16 checkpoint to symmetric INT4 pack-quantized,
for the side-by-side bench (benches/ckpt_bench.sh).

Usage: ckpt_peer_ct.py IN_DIR OUT_DIR [GROUP]   (GROUP 32/64/128, 0 = channelwise; default 32)

Tensor by tensor, shard by shard (like compressed-tensors' convert_checkpoint entrypoint): every
2-D `*.weight` except lm_head / embeddings gets compressed-tensors' own scale
(`calculate_qparams` on the group min/max) and is compressed by
`PackedQuantizationCompressor.compress` (quantize + pack_to_int32 + weight_shape); other tensors
are copied; shards are written with safetensors' save_file; config.json gets the
quantization_config. torch uses as many threads as the machine has cores.
"""
import json
import os
import shutil
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams


def main():
    src, dst = sys.argv[1], sys.argv[2]
    g = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    torch.set_num_threads(os.cpu_count() or 1)
    strategy = "channel" if g == 0 else "group"
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy=strategy, group_size=(g or None))
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    os.makedirs(dst)
    t0 = time.time()
    nbytes = 0
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    weight_map = {}
    for shard in shards:
        out = {}
        with safe_open(os.path.join(src, shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                nbytes += t.numel() * t.element_size()
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                if module is None or t.dim() != 2 or module == "lm_head" or "embed" in module:
                    out[name] = t
                    continue
                n, k = t.shape
                gs = k if g == 0 else g
                wg = t.float().reshape(n, k // gs, gs)
                scale, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
                scale = scale.to(torch.bfloat16).reshape(n, k // gs)
                sd = PackedQuantizationCompressor.compress({"weight": t, "weight_scale": scale}, scheme)
                for key, v in sd.items():
                    out[f"{module}.{key}"] = v.contiguous()
        save_file(out, os.path.join(dst, shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in out})
        del out
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {
        "config_groups": {"group_0": scheme.model_dump()},
        "format": "pack-quantized",
        "ignore": ["lm_head", "re:.*embed"],
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    if os.path.exists(os.path.join(src, "model.safetensors.index.json")):
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": nbytes}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    for extra in os.listdir(src):
        if not extra.endswith(".safetensors") and extra not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(os.path.join(src, extra), dst)
    dt = time.time() - t0
    print(f"compressed-tensors: {nbytes / 1e9:.3f} GB in {dt:.2f} s = {nbytes / 1e9 / dt:.3f} GB/s")


if __name__ == "__main__":
    main()

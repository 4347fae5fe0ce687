#!/usr/bin/env python3
"""Writes a synthetic Llama-like BF16 checkpoint for the checkpoint-conversion bench.

Usage: ckpt_gen.py OUT_DIR [LAYERS]

hidden 2048, intermediate 5632, vocab 32000, LAYERS decoder layers (default 18: about 2.1 GB),
weights N(0, 0.02) rounded to BF16, two shards with an index and a config.json, as
transformers' save_pretrained lays them out. Needs numpy only.
"""
import json
import os
import struct
import sys

import numpy as np


def bf16_bytes(rng, shape, std):
    x = (rng.standard_normal(size=shape, dtype=np.float32) * np.float32(std)).view(np.uint32)
    # round to nearest even
    x = (x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return x.astype(np.uint16).tobytes()


def write_shard(path, tensors):
    # safetensors layout: 8-byte header length, JSON header, data (tensors sorted by name; all BF16)
    header = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, data in tensors:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header, separators=(",", ":"))
    h += " " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h.encode())
        for _, _, data in tensors:
            f.write(data)


def main():
    out = sys.argv[1]
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 18
    hidden, inter, vocab = 2048, 5632, 32000
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for l in range(layers):
        p = f"model.layers.{l}"
        names += [
            (f"{p}.input_layernorm.weight", (hidden,), 1.0),
            (f"{p}.post_attention_layernorm.weight", (hidden,), 1.0),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden), 0.02),
            (f"{p}.self_attn.k_proj.weight", (hidden // 4, hidden), 0.02),
            (f"{p}.self_attn.v_proj.weight", (hidden // 4, hidden), 0.02),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden), 0.02),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden), 0.02),
            (f"{p}.mlp.up_proj.weight", (inter, hidden), 0.02),
            (f"{p}.mlp.down_proj.weight", (hidden, inter), 0.02),
        ]
    names = [("model.embed_tokens.weight", (vocab, hidden), 0.02)] + names
    names += [("model.norm.weight", (hidden,), 1.0), ("lm_head.weight", (vocab, hidden), 0.02)]
    half = len(names) // 2
    shards = [names[:half], names[half:]]
    weight_map = {}
    total = 0
    nparams = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = [(n, s, bf16_bytes(rng, s, std)) for n, s, std in sorted(shard)]
        for n, s, d in tensors:
            weight_map[n] = fname
            total += len(d)
            nparams += int(np.prod(s))
        write_shard(os.path.join(out, fname), tensors)
        del tensors
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_parameters": nparams, "total_size": total}, "weight_map": weight_map},
                  f, indent=2, sort_keys=True)
        f.write("\n")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": inter,
        "model_type": "llama", "num_attention_heads": 16, "num_hidden_layers": layers,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16", "vocab_size": vocab,
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    print(f"{out}: {total / 1e9:.2f} GB, {nparams} parameters")


if __name__ == "__main__":
    main()

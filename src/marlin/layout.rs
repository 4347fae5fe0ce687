//! Marlin layout kernels (DESIGN §3): `gptq_marlin_repack`, `marlin_permute_scales`, inverses.

// Marlin layout kernels.

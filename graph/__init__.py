"""Graph kernels: exact k-NN blocks, top-k merging, the weighted graph matrix, label propagation."""

"""Clustering kernels: k-means steps, Markov clustering, clustering metrics."""

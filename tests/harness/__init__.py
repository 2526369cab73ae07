"""Helpers that start real parts (etcd, coil-allocator, coild, BIRD, network namespaces) for tests and the demo."""

"""Helpers that start real parts (etcd, allocator, coild, BIRD, namespaces) for tests, demo."""

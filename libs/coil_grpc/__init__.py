"""coil's gRPC edge, shared by both servers: how a domain error becomes a gRPC status.

It sits beside `coil_core` rather than in it because it imports grpc, which the pure core must
not; it imports nothing else of the project (an import-linter contract says so), so that neither
service reaches into the other to share it.
"""

"""coil's gRPC edge, shared by both servers (the allocator and coild): how a domain error becomes
a gRPC status, and who is calling and what it may do.

It sits beside `coil_core` rather than in it because it imports grpc, which the pure core must
not; it imports nothing else of the project (an import-linter contract says so), so that neither
service reaches into the other to share it.

- `coil_grpc.status`: domain errors to statuses (one interceptor);
- `coil_grpc.policy`: roles, and the policy file that maps certificate subjects to them (pure);
- `coil_grpc.access`: the per-RPC rule table of both services and the decision for a call (pure);
- `coil_grpc.identity`: who a caller is (its client certificate, or a UNIX-socket peer);
- `coil_grpc.guard`: the one server interceptor that identifies, authorizes, bounds expensive
  reads and writes the audit line;
- `coil_grpc.auditlog`: the audit line; `coil_grpc.limits`: the bound on expensive reads;
- `coil_grpc.files`: secrets from files, UNIX sockets only their owner can reach;
- `coil_grpc.http`: a small HTTP server with read timeouts and a connection cap (metrics).
"""

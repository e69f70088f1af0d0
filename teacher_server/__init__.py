"""The teacher side of kdserve: one engine, thin gRPC / Ray Serve / Triton frontends over it."""

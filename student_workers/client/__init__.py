"""The student's client of the shared teacher: errors, addresses, transports (gRPC, Triton), the
async and sync clients, their stats, and the prefetcher that keeps requests in flight."""

"""Transports: gRPC and HTTP adapters around the domain and storage."""

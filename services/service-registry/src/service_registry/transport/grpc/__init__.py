"""gRPC transport of the registry: servicer, auth interceptor, protobuf mapping."""

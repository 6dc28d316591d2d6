"""gRPC TicketService: servicer, protobuf mapping, authorization interceptor."""

"""HTTP read API: /api/v1/tickets ..."""

"""HTTP transport of the registry: read-only worker routes."""

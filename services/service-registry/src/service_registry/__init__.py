"""Hive Flow C service-registry."""

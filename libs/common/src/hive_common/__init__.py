"""Shared runtime for the Hive Flow C services."""

"""Hive Flow C execution-ticket-service."""

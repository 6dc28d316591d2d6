"""Hive Flow C orchestrator-dynamic."""

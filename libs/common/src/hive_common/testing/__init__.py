"""Test support shared by every Hive Flow C package (the database plugin lives here)."""

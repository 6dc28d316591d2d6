"""The registry's rules: worker model, health timeline, validation and ranking (no I/O)."""

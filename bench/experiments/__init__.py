"""One-off experiments that back a finding of the benchmark report with numbers."""

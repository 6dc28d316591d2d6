"""``python -m bench``: run the benchmarks and print the report."""

from bench.run import main

if __name__ == "__main__":
    raise SystemExit(main())

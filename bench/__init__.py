"""``make bench``: the Hive Flow C benchmarks (issue 7).

Every figure is measured beside a baseline in the same run on the same machine (a bare
grpc.aio echo service, raw psycopg ``executemany``, a floor computed from figures of this
run) and reported with the ratio and the issue's targets. Run ``uv run --all-packages python
-m bench --help``. Benchmarks print a report; they assert nothing and are never tests.
"""

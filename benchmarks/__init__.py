"""Benchmarks for aioserve: each compares aioserve against a bare Starlette app in the same run."""

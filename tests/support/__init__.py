"""Fixtures and helpers that only the tests (and bench/) use: the CLI driver, fault proxies,
build-graph seed data and the reliability drivers."""

"""Shared plumbing: config parsing, the runner, executors, jobs, logging and provenance."""

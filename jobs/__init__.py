"""Orchestration: configs, the Ray runtime, one module per pipeline stage, the CLI."""

"""Commands behind the CLI: orchestration that ties the library layers together (index, bench and its baselines, flow-check, ablate)."""

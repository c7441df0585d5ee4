"""The driver: strategy, steps, evaluation fan-out, run store, CLI. Issues calls to actors only."""

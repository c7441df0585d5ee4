"""The paper's programs with their data and metrics; each module exposes ``Program``, ``load_splits``, ``metric``."""

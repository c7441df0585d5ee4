"""Ray Serve application publishing a run's winning program (see issue: serve/)."""

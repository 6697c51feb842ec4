"""imagegen plugin package: step caching (First-Block Cache, MagCache) for any family."""

"""imagegen plugin package for the zimage model family."""

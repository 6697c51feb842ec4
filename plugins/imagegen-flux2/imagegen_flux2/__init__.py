"""imagegen plugin package for the flux2 model family."""

"""Fleet health analysis."""

"""and_dist: distributed trainer for Unsupervised Deep Learning by Neighbourhood Discovery (AND)."""

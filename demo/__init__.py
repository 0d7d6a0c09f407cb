"""The demo corpus: real text of three quality levels assembled from package registries."""

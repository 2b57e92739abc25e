"""Models as named things: tasks and model types, the catalog, the on-disk store, downloads, loaded models."""

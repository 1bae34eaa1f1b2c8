"""LightningDataModules and datasets: the built-in procedural Shapes data."""

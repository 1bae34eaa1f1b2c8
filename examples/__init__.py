"""Examples of using and extending vugen; importable so YAML configs can name their classes."""

"""Command-line tools beside the package (converters), and `tools.model_folder`, which demo, bench and tests share."""

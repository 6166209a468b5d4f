"""frankly directions: edit math, direction files, extraction, evaluation and baking."""

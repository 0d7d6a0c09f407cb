"""Stage 1's scorers: heuristic rules, the quality classifier, and the Ray actors that apply them."""

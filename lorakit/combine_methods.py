"""The names of lorakit.combine's methods, apart from it (it imports torch and the layers), so that
``lorakit combine --help`` lists them as choices without loading torch."""

SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # A and B combined separately
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # full deltas, cut by an SVD
METHODS = ("cat",) + SAME_RANK + SVD

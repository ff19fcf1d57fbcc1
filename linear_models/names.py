"""The names every package shares, and the paper's numbers, defined once.

knowcat, linear_models and reports import them from here (linear_models never imports knowcat,
so the shared names live on this side).
"""

# SliCK's categories (Gekhman et al. 2024), in order from most to least known
CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
KNOWN = CATEGORIES[:3]
UNKNOWN = CATEGORIES[3]

# the three classes of a linear system A x = b (the Ax=b hypothesis), and the two labels the matrix-free
# path adds when it cannot tell
CLASSES = ("no_solution", "unique", "infinitely_many")
CONSISTENT_RANK_UNKNOWN = "consistent_rank_unknown"  # solutions exist; unique or not cannot be told
UNDETERMINED = "undetermined"  # neither consistency nor inconsistency established within the budget
EXTRA_LABELS = (CONSISTENT_RANK_UNKNOWN, UNDETERMINED)

# ---------------------------------------------------------------------------------------------
# the paper's numbers (Gekhman et al. 2024, arXiv 2405.05904)

# the categorized EntityQuestions train set (81,700 examples)
PAPER_CATEGORY_SHARES = {"HighlyKnown": 0.24, "MaybeKnown": 0.23, "WeaklyKnown": 0.17, "Unknown": 0.36}

# Accuracy = b0 + b_kn * N_kn / |D| + b_unk * N_unk / |D| over the (variant, epoch) points
PAPER_LINEAR_MODEL = {
    "in_distribution": {"b0": 36.9, "b_kn": 7.3, "b_unk": -8.3, "r2": 0.86},
    "ood": {"b0": 36.2, "b_kn": 3.2, "b_unk": -3.0, "r2": 0.95},
}

# Table 2: test accuracy (Full / HighlyKnown / MaybeKnown / WeaklyKnown / Unknown)
PAPER_TABLE2 = {
    "early_stop": {"HighlyKnown": (40.5, 98.7, 60.1, 9.0, 0.6), "MaybeKnown": (43.6, 98.4, 69.9, 12.1, 1.0),
                   "WeaklyKnown": (39.2, 95.0, 59.2, 8.6, 0.4), "Unknown": (37.5, 95.6, 52.9, 6.5, 0.6),
                   "natural": (43.5, 98.0, 67.6, 14.1, 1.8)},
    "convergence": {"HighlyKnown": (40.0, 98.4, 58.8, 8.5, 0.7), "MaybeKnown": (43.2, 97.5, 68.2, 12.9, 1.3),
                    "WeaklyKnown": (35.4, 73.5, 55.8, 17.2, 2.2), "Unknown": (25.8, 55.8, 36.6, 12.2, 3.2),
                    "natural": (41.8, 95.5, 61.7, 14.8, 2.5)},
}

# D_IDK: accuracy on the questions it answers, and the share it answers (percent)
PAPER_IDK = {"accuracy_answered": 61.8, "answered_share": (56, 59)}

"""Evaluation: the prior's cosine suite, the cascade's image metrics, the HTML report."""

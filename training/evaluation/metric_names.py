"""The names of the metrics the evaluations write: the one list promotion gates and reports read."""

from __future__ import annotations

PRIOR_METRICS_FILE = "prior_metrics.json"
# The prior's cosine suite (``evaluation.prior_cosines``), in ``eval/{prior_run}/prior_metrics.json``.
PRIOR_METRIC_NAMES = ("cos_pred_true", "cos_pred_text", "cos_pred_unrelated", "cos_text_baseline")
# The cascade's metrics (``cascade_eval.evaluate_cascade``), in
# ``eval/{decoder_run}/decoder_metrics.json``; the upsampler is judged by the same ones.
CASCADE_METRIC_NAMES = (
    "attribute_accuracy",
    "attribute_accuracy_untrained",
    "fd_clip",
    "fd_clip_untrained",
    "fd_clip_bilinear",
    "clip_score",
    "clip_score_real",
    "fid",
    "fid_untrained",
    "kid",
    "kid_untrained",
)
# What a run's summary shows of the cascade's metrics.
CASCADE_SUMMARY_NAMES = (
    "attribute_accuracy",
    "fd_clip",
    "fd_clip_untrained",
    "fd_clip_bilinear",
    "clip_score",
    "clip_score_real",
    "fid",
    "kid",
)

"""Scoring generated videos, framework-free: VBench's weight-free dimensions, its score composition, and the caption
accuracy of the synthetic demo set; `contentv_common/cli/eval.py` runs them over a folder of clips."""

"""Evaluation of generated videos: an analytic detector for the synthetic data and video metrics."""

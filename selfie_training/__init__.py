"""Data, metrics, model cards and Trainer pieces shared by the Selfie training scripts."""

"""Hydra multiruns as MLflow parent runs, and Optuna studies shared between processes."""

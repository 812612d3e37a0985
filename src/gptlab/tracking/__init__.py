"""What MLflow holds: the store, the background recorder, comparisons and the logged model."""

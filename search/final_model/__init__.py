"""The final model: the winner's configuration, the retrain, the one test, the registry."""

"""modeldeploy operator: reconciles ModelDeployment resources."""

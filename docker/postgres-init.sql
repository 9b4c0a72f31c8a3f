-- One server, two databases: Optuna studies and the MLflow backend store.
CREATE DATABASE mlflow;

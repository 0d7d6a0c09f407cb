"""Shared plumbing of trecflow: the recipe model, settings, the store and fingerprints.

Imports flow one way: flows -> tasks -> training -> trecflow. Nothing here imports Prefect,
MLflow, Ray or torch at module level.
"""

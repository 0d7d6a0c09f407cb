"""Model-side code: LR schedules, the EMA/TREC math, and (later) the trainer and re-evaluation.

Modules here must not import Prefect or MLflow; torch only in the modules that train.
"""

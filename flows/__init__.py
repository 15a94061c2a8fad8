"""Prefect flows: pipeline.py (the whole DAG)."""

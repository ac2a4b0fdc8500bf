"""Thin Prefect tasks over layermoe_core: one per pipeline step.

Tasks take and return plain, serialisable values (paths, DataFrames, lists), never live
models, so each can be cached on its inputs, retried and resumed.
"""

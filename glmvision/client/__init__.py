"""Clients of a running glmvision server: `glmvision ask` and `glmvision batch`."""

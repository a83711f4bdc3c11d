"""Datasets: collection of behaviour data into Minari, loading and window sampling."""

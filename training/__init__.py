"""Offline tools: datasets, the synthetic world, trainers, evaluation and bag writing."""

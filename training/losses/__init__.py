"""Losses and targets used only to train detector parts (never loaded at run time)."""

"""Diagnosis of training dynamics: pure Python and pandas, importable without torch."""

"""Helpers shared by the test modules: tolerances, attention-routing cases, repository paths."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

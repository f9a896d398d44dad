"""Cluster tests import their helper module (``local_cluster.py``) from this folder."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

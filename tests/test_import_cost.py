"""`import spmc` and the CLI load neither scikit-learn nor SciPy (seconds of start-up for every run of a sweep):
the defenses that cluster import scikit-learn when they first cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from spmc.defenses.flame import hdbscan_labels


def test_the_cli_does_not_load_scikit_learn_or_scipy() -> None:
    code = (
        "import json, sys, spmc, spmc.cli, spmc.simulation; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert "spmc" in loaded and "torch" in loaded
    assert not loaded & {"sklearn", "scipy"}


def test_a_clustering_defense_still_clusters() -> None:
    dist = torch.tensor([[0.0, 0.1, 0.9], [0.1, 0.0, 0.9], [0.9, 0.9, 0.0]], dtype=torch.float64)
    labels = hdbscan_labels(dist, min_cluster_size=2)
    assert labels[0] == labels[1] >= 0 and labels[2] == -1

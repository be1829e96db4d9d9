"""ClientApp: trains the node's partition (``partition-id`` / ``num-partitions`` of its node config) with spmc."""

from spmc.flower import make_client_app

app = make_client_app()

"""ServerApp: the defense, server-side A/ASR evaluation and checkpoints, configured by the run config."""

from spmc.flower import make_server_app

app = make_server_app()

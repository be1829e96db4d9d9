"""The server side over Flower: the initial model, the defense, server-side evaluation (A and ASR) and the run
directory, around :class:`~spmc.flower.strategy.DefenseStrategy`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from spmc.attacks import kind_of
from spmc.config import ConfigError, Experiment, build_defense
from spmc.data import DATA_DIR_ENV, DataError, load_split_folder
from spmc.defenses import Defense
from spmc.defenses.server_data import ServerData
from spmc.federation import FederatedData, Federation, OwnData, update_guard
from spmc.flower.convert import MetricValue, arrays_to_state, state_to_arrays
from spmc.flower.options import FlowerOptions, UserValue, parse_run_config
from spmc.flower.strategy import DefenseStrategy
from spmc.metrics import final_metrics
from spmc.params import ParamLayout
from spmc.store import RunStore

log = logging.getLogger(__name__)


@dataclass
class ServerSetup:
    """The server's pieces: test and backdoor sets, the model and its layout, the defense, θ^0."""

    cfg: Experiment
    data: FederatedData
    model: torch.nn.Module
    layout: ParamLayout
    defense: Defense
    server_data: ServerData | None
    initial_state: torch.Tensor
    federation: Federation


def build_server(cfg: Experiment, local_data: bool = False) -> ServerSetup:
    """The :class:`~spmc.federation.Federation` (evaluation sets, the defenses' server split, θ^0) and the defense,
    exactly as the simulator builds them; with ``local_data`` (nodes with their own files) from the server's own
    files only (:func:`server_files`)."""
    defense = build_defense(cfg)
    own = server_files(cfg, defense.needs_server_data) if local_data else None
    federation = Federation.build(cfg, own=own)
    server_data = federation.server_data() if defense.needs_server_data else None
    return ServerSetup(
        cfg,
        federation.data,
        federation.model,
        federation.layout,
        defense,
        server_data,
        federation.initial_state.cpu(),
        federation,
    )


def server_folder(cfg: Experiment) -> str:
    """The server's own data folder: ``data_dir`` of the run config, else ``$SPMC_DATA_DIR``."""
    folder = cfg.data_dir or os.environ.get(DATA_DIR_ENV, "")
    if not folder:
        raise ConfigError(
            f"run config: data_dir is not set (nor ${DATA_DIR_ENV}); local-data = true needs the server's own folder "
            f"with the test files of dataset {cfg.dataset!r}"
        )
    return folder


def server_files(cfg: Experiment, needs_server_data: bool) -> OwnData:
    """The server's own data when the nodes hold theirs: the test files of its folder and, for a defense that needs
    server data (spec §5), the training files of that folder as its whole clean validation split."""
    folder = server_folder(cfg)
    try:
        test_x, test_y = load_split_folder(cfg.dataset, folder, "test")
        if needs_server_data:
            val_x, val_y = load_split_folder(cfg.dataset, folder, "train")
        else:
            val_x, val_y = test_x[:0], test_y[:0]
    except (DataError, ValueError) as err:
        raise ConfigError(f"run config: data_dir = {folder!r} (local-data = true): {err}") from None
    return OwnData(val_x, val_y, test_x, test_y)


class ServerEvaluator:
    """``evaluate_fn`` for the strategy: A on the clean test set, ASR on the triggered one (as the engine)."""

    def __init__(self, setup: ServerSetup) -> None:
        self.setup = setup

    def evaluate_state(self, state: torch.Tensor) -> dict[str, float]:
        """accuracy, asr (per ``asr_exclude_target_class``), asr_all and asr_excl_target of a flat state, in %."""
        return self.setup.federation.evaluate(state)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics: dict[str, MetricValue] = dict(self.evaluate_state(arrays_to_state(self.setup.layout, arrays)))
        return MetricRecord(metrics)


def build_strategy(setup: ServerSetup, opts: FlowerOptions, store: RunStore | None = None) -> DefenseStrategy:
    """The strategy for ``setup.cfg``: its defense, SPMC teachers with the SPMC client, the Flower options."""
    cfg = setup.cfg
    return DefenseStrategy(
        setup.defense,
        setup.layout,
        send_teachers="spmc" in (cfg.client, cfg.malicious_client),
        participation=cfg.participation,
        seed=cfg.seed,
        on_invalid_update=cfg.on_invalid_update,
        guard=update_guard(cfg),
        server_data=setup.server_data,
        store=store,
        resume=opts.resume,
        config_json=cfg.to_json(),
        min_nodes=opts.min_nodes or cfg.num_clients,
        connect_timeout=opts.connect_timeout,
        identify_timeout=opts.identify_timeout,
        poll_interval=opts.poll_interval,
        initial_state=setup.initial_state.clone(),
        crafter=setup.federation.crafter(),
    )


def summarise(cfg: Experiment, records: list[dict[str, Any]]) -> dict[str, Any]:
    """A, R and V over the last ``report_last_k`` rounds plus what the run was (as the engine's summary)."""
    evaluated = [r for r in records if r.get("accuracy") is not None and r.get("asr") is not None]
    kind = kind_of(cfg.attack, cfg.update_attack)
    summary: dict[str, Any] = {
        "runtime": "flower",
        "rounds": len(records),
        "dataset": cfg.dataset,
        "defense": cfg.defense,
        "client": cfg.client,
        "gamma": cfg.gamma,
        "seed": cfg.seed,
        "attack_kind": kind,
        "num_clients": cfg.num_clients,
        "seconds_per_round": float(np.mean([r["seconds"] for r in records])) if records else None,
        "failed_per_round": [r.get("num_failed", 0) for r in records],
    }
    if evaluated:
        accuracies, asrs = [r["accuracy"] for r in evaluated], [r["asr"] for r in evaluated]
        final = final_metrics(accuracies, asrs, cfg.report_last_k, targeted=kind != "untargeted")
        summary.update(final.as_dict())
    return summary


def run_server(grid: Grid, cfg: Experiment, opts: FlowerOptions) -> Result:
    """Run the whole federation for ``cfg`` on ``grid``; with ``out-dir`` write the run directory and resume."""
    store = RunStore(opts.out_dir) if opts.out_dir else None
    if store is not None:
        store.lock()  # one writer per run directory, taken before any data is loaded
    try:
        setup = build_server(cfg, opts.local_data)
        if store is not None:
            store.write_config(cfg.to_json())
        strategy = build_strategy(setup, opts, store)
        result = strategy.start(
            grid,
            state_to_arrays(setup.layout, setup.initial_state),
            num_rounds=cfg.rounds,
            timeout=opts.round_timeout,
            evaluate_fn=ServerEvaluator(setup),
        )
        if store is not None:
            summary = summarise(cfg, store.read_metrics())
            store.write_summary(summary)
            log.info("summary: %s", {k: summary.get(k) for k in ("A", "R", "V", "rounds", "seconds_per_round")})
    finally:
        if store is not None:
            store.unlock()
    return result


def _ensure_logging() -> None:
    """Show spmc's INFO logs in a ServerApp process that configured no logging of its own."""
    logger = logging.getLogger("spmc")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def make_server_app(overrides: Mapping[str, UserValue] | None = None) -> ServerApp:
    """A ServerApp running spmc's defense for the run config; ``overrides`` take precedence (e.g. in tests)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        _ensure_logging()
        try:
            cfg, opts = parse_run_config(context.run_config, overrides)
            run_server(grid, cfg, opts)
        except (ConfigError, DataError) as err:  # one line naming the key first; Flower then marks the run failed
            log.error("%s", " ".join(str(err).split()))
            raise

    return app

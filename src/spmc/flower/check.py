"""Check a ``flwr run --run-config`` before submitting it: ``python -m spmc.flower.check APP_DIR --run-config ...``.

Flower's SuperLink refuses a run-config key that the app's ``pyproject.toml`` does not declare before any app code
runs, and ``flwr run`` then prints only ``[code: 15] Invalid run configuration.``: the key's name is in the
SuperLink's log alone. This check reads the same arguments the same way (Flower's own parser), names every
undeclared key, then validates the values as the ServerApp will (:func:`~spmc.flower.options.parse_run_config`),
and prints what would run, in one line either way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from flwr.common.config import flatten_dict, parse_config_args

from spmc.config import ConfigError, Experiment, load_toml_file
from spmc.flower.options import FlowerOptions, UserValue, parse_run_config


def declared_run_config(app_dir: str | Path) -> dict[str, UserValue]:
    """The run config an app declares (``[tool.flwr.app.config]`` of its ``pyproject.toml``), flattened as Flower
    does."""
    data = load_toml_file(Path(app_dir) / "pyproject.toml")
    config = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    return dict(flatten_dict(config))


def check_run_config(
    app_dir: str | Path, user: Mapping[str, UserValue]
) -> tuple[Experiment, FlowerOptions, dict[str, UserValue]]:
    """The configuration a run of the app at ``app_dir`` with the user's keys ``user`` resolves to, and the merged
    run config; a key the app does not declare is a :class:`ConfigError` naming it (as the SuperLink refuses it)."""
    declared = declared_run_config(app_dir)
    undeclared = sorted(set(user) - set(declared))
    if undeclared:
        raise ConfigError(
            f"run config: {', '.join(repr(k) for k in undeclared)} not declared in {Path(app_dir) / 'pyproject.toml'} "
            f"([tool.flwr.app.config]), so Flower refuses the run ('[code: 15] Invalid run configuration'); "
            f"declared keys: {', '.join(sorted(declared))}"
        )
    merged = {**declared, **user}
    cfg, opts = parse_run_config(merged)
    return cfg, opts, merged


def describe(cfg: Experiment, opts: FlowerOptions) -> str:
    """One line: what the run would be."""
    return (
        f"run config ok: dataset={cfg.dataset} num_clients={cfg.num_clients} rounds={cfg.rounds} "
        f"defense={cfg.defense} client={cfg.client} attack={cfg.attack} gamma={cfg.gamma} "
        f"epochs={cfg.local_epochs(cfg.client)} out-dir={opts.out_dir or '(none)'} local-data={opts.local_data}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spmc.flower.check APP_DIR [--run-config 'k=v ...' | FILE.toml]``: 0 and a summary line when
    the run config is valid, 2 and one error line naming the key otherwise."""
    parser = argparse.ArgumentParser(prog="python -m spmc.flower.check", description=__doc__.splitlines()[0])
    parser.add_argument("app_dir", help="the Flower app's folder (with pyproject.toml), as given to `flwr run`")
    parser.add_argument("--run-config", action="append", default=None, help="as for `flwr run` (repeatable)")
    args = parser.parse_args(argv)
    try:
        user = parse_config_args(args.run_config)
        cfg, opts, _ = check_run_config(args.app_dir, user)
    except (ConfigError, ValueError, OSError) as err:
        sys.stderr.write(f"error: {' '.join(str(err).split())}\n")
        return 2
    except Exception as err:  # Flower's parser raises click's exception for a malformed string
        sys.stderr.write(f"error: {' '.join(str(getattr(err, 'message', err)).split())}\n")
        return 2
    sys.stdout.write(describe(cfg, opts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

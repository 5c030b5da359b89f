"""``python -m dicom_node [--config FILE]`` → the node, without the rest of the ``lungvision`` CLI."""

import argparse
from pathlib import Path

from config.settings import ConfigError, load_settings
from dicom_node.node import run_node


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m dicom_node", description="Run the Lung Vision DICOM node.")
    parser.add_argument("--config", type=Path, default=None, help="YAML file overriding the defaults")
    config_file = parser.parse_args().config
    try:
        settings = load_settings(config_file)
    except ConfigError as error:
        parser.error(str(error))
    run_node(settings, reload_settings=lambda: load_settings(config_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

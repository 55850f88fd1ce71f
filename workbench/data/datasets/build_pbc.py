"""Rebuild the bundled PBC MEDS dataset from ``pbc/raw/pbcseq.csv`` with the importers.

Run ``python -m workbench.data.datasets.build_pbc``. The whole conversion is the configuration
in ``pbc/import.yaml``; this module only runs it and swaps the result into place. The raw CSV,
the config and the README stay where they are; ``data/`` and ``metadata/`` are replaced.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from workbench.data.importers import ImportConfig, import_dataset
from workbench.data.meds_io import DATA_DIR, MedsDataset

PBC_DIR = Path(__file__).resolve().parent / "pbc"
CONFIG_FILE = PBC_DIR / "import.yaml"
#: What a build writes (and replaces) inside the dataset root.
GENERATED = (DATA_DIR, "metadata")


def build(output: str | Path | None = None) -> MedsDataset:
    """Build the PBC MEDS dataset into ``output`` (default: the bundled ``pbc/`` directory).

    A separate ``output`` gets a fresh dataset (replacing one there). The bundled directory is
    built in a temporary sibling first and only its ``data/`` and ``metadata/`` are swapped in.
    """
    config = ImportConfig.from_yaml(CONFIG_FILE)
    target = PBC_DIR if output is None else Path(output)
    if target.resolve() != PBC_DIR:
        return import_dataset(config, target, overwrite=True)
    with tempfile.TemporaryDirectory(prefix=".pbc-build-", dir=PBC_DIR.parent) as tmp:
        built = Path(tmp) / "pbc"
        import_dataset(config, built)
        for name in GENERATED:
            old = PBC_DIR / name
            if old.exists():
                os.replace(old, Path(tmp) / f"old-{name}")
            os.replace(built / name, old)
        shutil.rmtree(built, ignore_errors=True)
    return MedsDataset(PBC_DIR)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: rebuild in place, or into ``--output``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None, help="write here instead of the bundled pbc/")
    args = parser.parse_args(argv)
    dataset = build(args.output)
    events = dataset.events().collect()
    print(f"{dataset.root}: {events.height} events, {events['subject_id'].n_unique()} subjects")


if __name__ == "__main__":
    main()

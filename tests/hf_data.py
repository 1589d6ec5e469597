"""Test data made by the real producers people download it from: Hugging Face ``datasets`` and ``img2dataset``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# datasets must never reach the Hub in a test: everything it writes here is built from local files.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

# img2dataset pins pandas < 3 and pulls opencv, albumentations and wandb, which this package's environment does not
# want: it runs from a venv of its own, built once (pip, from the package index) and kept between sessions.
IMG2DATASET = "img2dataset==1.47.0"
IMG2DATASET_VENV = Path(
    os.environ.get("MNASNET_IMG2DATASET_VENV", Path.home() / ".cache" / "mnasnet-batch" / "img2dataset-1.47.0")
)
# Seconds a pip install of img2dataset may take (its wheels: ~100 MB), and img2dataset's download of a few images.
INSTALL_S = 900
DOWNLOAD_S = 300


def image_feature_rows(images: list[Path], by_path: tuple[int, ...] = ()) -> list[dict]:
    """Values of a ``datasets.Image`` column: each image's bytes with its file name, as the Hub's Parquet files
    hold them; the rows ``by_path`` with no bytes and the image's absolute path instead."""
    return [
        {"bytes": None, "path": str(path)} if i in by_path else {"bytes": path.read_bytes(), "path": path.name}
        for i, path in enumerate(images)
    ]


def hf_dataset(images: list[Path], labels: list[int] | None = None, by_path: tuple[int, ...] = ()):
    """A ``datasets.Dataset`` of ``images`` (an ``Image`` feature) and their ImageNet-1k ``label`` (a
    ``ClassLabel`` of 1000 classes, as ImageNet copies on the Hub have)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})
    labels = labels if labels is not None else [i % 1000 for i in range(len(images))]
    return datasets.Dataset.from_dict({"image": image_feature_rows(images, by_path), "label": labels}, features)


def ensure_img2dataset() -> Path:
    """The ``img2dataset`` command of its own venv, built with pip the first time.

    Raises:
        subprocess.CalledProcessError: pip could not install it (no package index reachable, say).
    """
    command = IMG2DATASET_VENV / "bin" / "img2dataset"
    if not command.exists():
        subprocess.run([sys.executable, "-m", "venv", str(IMG2DATASET_VENV)], check=True, timeout=120)
        pip = [str(IMG2DATASET_VENV / "bin" / "python"), "-m", "pip", "install", "-q", IMG2DATASET]
        subprocess.run(pip, check=True, timeout=INSTALL_S)
    return command


def run_img2dataset(url_list: Path, output: Path, per_shard: int) -> None:
    """img2dataset's WebDataset output of the URLs of ``url_list`` (a CSV of ``url`` and ``caption``), each image
    kept as it was served (no re-encoding), ``per_shard`` samples a shard; one process, no wandb, no network but
    the URLs'."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    subprocess.run(
        [
            str(ensure_img2dataset()),
            f"--url_list={url_list}",
            "--input_format=csv",
            "--url_col=url",
            "--caption_col=caption",
            f"--output_folder={output}",
            "--output_format=webdataset",
            "--processes_count=1",
            "--thread_count=4",
            f"--number_sample_per_shard={per_shard}",
            "--disable_all_reencoding=True",
            "--enable_wandb=False",
            "--distributor=multiprocessing",
        ],
        check=True,
        timeout=DOWNLOAD_S,
        env=env,
        capture_output=True,
    )

"""Screenshots of what a user sees in TensorBoard, taken by headless Chromium.

    .venv/bin/python scripts/tensorboard_screenshots.py --logdir runs/demo --output docs/images

Without --logdir it first trains the tiny smoke config (configs/smoke/mole_tiny_llama.yaml, 60
steps, about a minute) into a temporary folder. It starts TensorBoard on the folder, opens each
dashboard (custom scalars, scalars, images, histograms, text) in Debian's Chromium
(`apt-get install chromium`) and writes one PNG per dashboard to --output, plus the newest
`*/expert_load` figure at its actual size (what the images tab shows with "Show actual image
size" ticked), as expert_load.png.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ("custom_scalars", "scalars", "images", "histograms", "text")
# as the machine notes prescribe: without the networking flags Chromium keeps dialling Google
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def tiny_run(folder: Path) -> Path:
    command = [
        sys.executable, "-m", "lightning_moe", "fit",
        "--config", str(ROOT / "configs/smoke/mole_tiny_llama.yaml"),
        "--trainer.max_steps=60", "--trainer.log_every_n_steps=2",
        "--model.init_args.routing_log_every_n_steps=10",
        f"--trainer.logger.init_args.save_dir={folder}",
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: TensorBoard did not answer at {url} within {seconds:.0f} s")


def screenshot(url: str, target: Path, size: str, profile: Path) -> None:
    command = [
        "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
        "--virtual-time-budget=20000", f"--screenshot={target}", url,
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    print(f"{target} ({target.stat().st_size // 1024} KiB) <- {url}")


def save_newest_figure(logdir: Path, suffix: str, target: Path) -> None:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = EventMultiplexer(size_guidance={"images": 1}).AddRunsFromDirectory(str(logdir)).Reload()
    for run, tags in runs.Runs().items():
        for tag in tags["images"]:
            if tag.endswith(suffix):
                target.write_bytes(runs.Images(run, tag)[-1].encoded_image_string)
                print(f"{target} <- {run} {tag}")
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, help="A run folder (default: a fresh tiny run).")
    parser.add_argument("--output", type=Path, default=ROOT / "docs/images")
    parser.add_argument("--size", default="1400,1600", help="Browser window, width,height in pixels.")
    settings = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        logdir = settings.logdir or tiny_run(Path(scratch) / "runs")
        port = free_port()
        board = subprocess.Popen(
            [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(logdir), "--port", str(port),
             "--host", "127.0.0.1", "--reload_interval", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(f"{base}/data/runs")
            settings.output.mkdir(parents=True, exist_ok=True)
            for dashboard in DASHBOARDS:
                target = settings.output / f"tensorboard_{dashboard}.png"
                screenshot(f"{base}/#{dashboard}", target, settings.size, Path(scratch) / "chromium")
            save_newest_figure(logdir, "expert_load", settings.output / "expert_load.png")
        finally:
            board.terminate()
            board.wait(timeout=30)


if __name__ == "__main__":
    main()

